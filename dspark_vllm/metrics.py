"""DSpark's serving metrics: what the scheduler decided and how it turned out.

The numbers are gathered where they happen, in the engine's worker process
(`EngineStats`), and published as one small JSON file that is replaced
atomically after every step. The process that serves `/metrics` (the API
server, or the `vllm.LLM` process for `llm.get_metrics()`) registers a
Prometheus collector (`DSparkCollector`) that reads the file at scrape time,
so the metrics sit on vLLM's own `/metrics` next to vLLM's, without going
through vLLM's private stats objects.

Per draft position k (1-based, like the paper):
- drafted:   slots the drafter proposed;
- verified:  slots the policy sent to the target (the verification budget);
- accepted:  slots that survived verification;
- predicted: sum of the calibrated cumulative survival a_k of verified slots.
So `predicted / verified` vs `accepted / verified` compares the confidence
head's promise with what happened (a running calibration error is their gap).
Per step: the verification budget (draft tokens verified), the measured step
time and the step time the engine cost profile predicted, 1 / SPS(B).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BUDGET_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass
class EngineStats:
    """Cumulative counters of one engine (worker rank 0)."""

    policy: str
    block_size: int
    drafted: list[int] = field(default_factory=list)
    verified: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    predicted: list[float] = field(default_factory=list)
    steps: int = 0
    budget_sum: int = 0
    budget_buckets: list[int] = field(default_factory=lambda: [0] * len(BUDGET_BUCKETS))
    step_time_sum: float = 0.0
    profiled_step_time_sum: float = 0.0
    profiled_steps: int = 0

    def __post_init__(self):
        for name in ("drafted", "verified", "accepted"):
            if not getattr(self, name):
                setattr(self, name, [0] * self.block_size)
        if not self.predicted:
            self.predicted = [0.0] * self.block_size

    def record_drafts(self, num_requests: int, num_tokens: int, verify_lengths: list[int]) -> None:
        """One drafting round: num_requests blocks of num_tokens, and how many of each go to verification."""
        for k in range(num_tokens):
            self.drafted[k] += num_requests
        budget = sum(verify_lengths)
        self.steps += 1
        self.budget_sum += budget
        for i, edge in enumerate(BUDGET_BUCKETS):
            if budget <= edge:
                self.budget_buckets[i] += 1

    def record_verification(self, num_verified: int, num_accepted: int, survival: list[float] | None) -> None:
        """One request's verification: `survival` is the calibrated a_k of its verified slots."""
        for k in range(num_verified):
            self.verified[k] += 1
            if survival is not None:
                self.predicted[k] += float(survival[k])
        for k in range(num_accepted):
            self.accepted[k] += 1

    def record_step_time(self, seconds: float, profiled_seconds: float | None) -> None:
        self.step_time_sum += seconds
        if profiled_seconds is not None:
            self.profiled_step_time_sum += profiled_seconds
            self.profiled_steps += 1

    def calibration_error(self) -> float:
        """sum_k |predicted_k - accepted_k| / sum_k verified_k over verified slots (0 when none)."""
        total = sum(self.verified)
        if total == 0:
            return 0.0
        return sum(abs(p - a) for p, a in zip(self.predicted, self.accepted)) / total

    def publish(self, path: str | os.PathLike) -> None:
        """Atomically replace `path` with the current counters."""
        path = Path(path)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(self) | {"time": time.time()}))
        os.replace(tmp, path)


def read_stats(path: str | os.PathLike) -> EngineStats | None:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    raw.pop("time", None)
    return EngineStats(**raw)


class DSparkCollector:
    """A Prometheus collector that reads the engine's published counters at scrape time.

    One per process, reporting the most recently configured DSpark engine
    (`point_at`); metric names carry vLLM's `vllm:` prefix so that
    `vllm.LLM.get_metrics()` returns them too.
    """

    def __init__(self):
        self.path: str | None = None

    def point_at(self, path: str) -> None:
        self.path = path

    def describe(self):
        return []  # no fixed description: the registry must not call collect() at registration

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        stats = read_stats(self.path) if self.path else None
        if stats is None:
            return
        per_position = {
            "drafted": "Draft tokens proposed, by draft position",
            "verified": "Draft tokens sent to verification, by draft position",
            "accepted": "Draft tokens accepted by verification, by draft position",
            "predicted_accepted": "Sum of calibrated survival predicted for verified draft tokens, by position",
        }
        values = {"drafted": stats.drafted, "verified": stats.verified, "accepted": stats.accepted,
                  "predicted_accepted": stats.predicted}
        for name, doc in per_position.items():
            fam = CounterMetricFamily(f"vllm:dspark_{name}_tokens", doc, labels=["position"])
            for k, v in enumerate(values[name]):
                fam.add_metric([str(k + 1)], v)
            yield fam

        info = GaugeMetricFamily("vllm:dspark_policy_info", "The DSpark verification policy in use",
                                 labels=["policy"])
        info.add_metric([stats.policy], 1)
        yield info

        # budget_buckets are already cumulative: bucket i counts steps with budget <= edge i.
        buckets = [(str(edge), count) for edge, count in zip(BUDGET_BUCKETS, stats.budget_buckets)]
        buckets.append(("+Inf", stats.steps))
        yield HistogramMetricFamily("vllm:dspark_verification_budget_tokens",
                                    "Draft tokens verified per step (all requests)",
                                    buckets=buckets, sum_value=stats.budget_sum)

        yield GaugeMetricFamily("vllm:dspark_calibration_error",
                                "Running |predicted - observed| accepted tokens per verified draft token",
                                value=stats.calibration_error())
        yield CounterMetricFamily("vllm:dspark_step_time_seconds",
                                  "Measured time of verification steps (target + draft forward)",
                                  value=stats.step_time_sum)
        yield CounterMetricFamily("vllm:dspark_profiled_step_time_seconds",
                                  "Step time the engine cost profile predicted, sum of 1/SPS(B)",
                                  value=stats.profiled_step_time_sum)
        yield CounterMetricFamily("vllm:dspark_steps", "Drafting rounds (engine steps with drafts)",
                                  value=stats.steps)


_COLLECTOR: DSparkCollector | None = None


def serve_metrics_from(path: str) -> None:
    """Register (once per process) the collector and point it at this engine's file."""
    global _COLLECTOR
    if _COLLECTOR is None:
        from prometheus_client import REGISTRY

        _COLLECTOR = DSparkCollector()
        REGISTRY.register(_COLLECTOR)
    _COLLECTOR.point_at(path)
