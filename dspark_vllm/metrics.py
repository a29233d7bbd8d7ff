"""DSpark's serving metrics: what the scheduler decided and how it turned out.

The numbers are counted where they happen, in the engine's worker process
(`EngineStats`), directly in a small shared-memory array (a memory-mapped file
under /dev/shm where it exists): recording a step is a few in-memory additions,
with no file write and no serialisation on the step's path. The process that
serves `/metrics` (the API server, or the `vllm.LLM` process for
`llm.get_metrics()`) registers a Prometheus collector (`DSparkCollector`) that
copies the array at scrape time, so the metrics sit on vLLM's own `/metrics`
next to vLLM's, are never behind the last finished step, and go through no
private vLLM stats object. A sequence counter (a seqlock) lets the reader
detect and retry a copy taken while a step was writing.

Per draft position k (1-based, like the paper):
- drafted:   slots the drafter proposed;
- verified:  slots the policy sent to the target (the verification budget);
- accepted:  slots that survived verification;
- predicted: sum of the calibrated cumulative survival a_k of verified slots;
- temperature: the STS temperature in use (gauge; online refinement changes it).
So `predicted / verified` vs `accepted / verified` compares the confidence
head's promise with what happened (a running calibration error is their gap).
Per step: whether the drafter ran (the break-even guard may skip it), the
verification budget (draft tokens verified), the measured step time and the
step time the engine cost model predicted.
"""

from __future__ import annotations

import atexit
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .config import POLICIES

BUDGET_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_SCALARS = ("steps", "drafting_steps", "budget_sum", "step_time_sum", "profiled_step_time_sum",
            "profiled_steps", "refits", "live_ece")
_HEADER = ("seq", "num_positions", "policy")
_PER_POSITION = ("drafted", "verified", "accepted", "predicted", "temperature")


def default_metrics_path() -> Path:
    """A fresh file name in shared memory (or the temp dir where there is none)."""
    root = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return root / f"dspark-vllm-metrics-{os.getpid()}-{time.time_ns()}.bin"


def _layout(num_positions: int) -> dict[str, slice]:
    """Field name -> slice of the float64 array."""
    sizes = [(name, 1) for name in _HEADER + _SCALARS] + [("budget_buckets", len(BUDGET_BUCKETS))]
    sizes += [(name, num_positions) for name in _PER_POSITION]
    out, start = {}, 0
    for name, n in sizes:
        out[name] = slice(start, start + n)
        start += n
    return out


class EngineStats:
    """Cumulative counters of one engine (the worker of TP rank 0), in a float64 array.

    `path`: the shared file to keep the array in (None: private memory, for
    tests and workers whose counters nobody reads). Every field is a numpy
    view: `stats.verified[k]`, `stats.steps[0]`.
    """

    def __init__(self, policy: str, num_positions: int, path: str | os.PathLike | None = None):
        self.layout = _layout(num_positions)
        size = max(s.stop for s in self.layout.values())
        if path is None:
            self.array = np.zeros(size)
        else:
            self.array = np.memmap(path, dtype=np.float64, mode="w+", shape=(size,))
        self.array[self.layout["num_positions"]] = num_positions
        self.array[self.layout["policy"]] = POLICIES.index(policy)
        for name, where in self.layout.items():
            setattr(self, name, self.array[where])

    # -- writers (worker) ---------------------------------------------------
    def _begin(self) -> None:
        self.seq[0] += 1  # odd: a write is in progress

    def _end(self) -> None:
        self.seq[0] += 1

    def record_step(self, num_drafting: int, num_positions: int, budget: int,
                    seconds: float | None, profiled_seconds: float | None) -> None:
        """One engine step: how many requests drafted (0: the drafter did not run),
        the verification budget the policy set for their drafts, and the step's
        measured and predicted time."""
        self._begin()
        self.steps[0] += 1
        if num_drafting:
            self.drafting_steps[0] += 1
            self.drafted[:num_positions] += num_drafting
            self.budget_sum[0] += budget
            self.budget_buckets[np.searchsorted(BUDGET_BUCKETS, budget):] += 1
        if seconds is not None:
            self.step_time_sum[0] += seconds
        if profiled_seconds is not None:
            self.profiled_step_time_sum[0] += profiled_seconds
            self.profiled_steps[0] += 1
        self._end()

    def record_verification(self, verified: np.ndarray, accepted: np.ndarray,
                            predicted: np.ndarray | None) -> None:
        """Per-position counts of one verification step (arrays of length num_positions)."""
        self._begin()
        self.verified += verified
        self.accepted += accepted
        if predicted is not None:
            self.predicted += predicted
        self._end()

    def record_calibration(self, temperatures: np.ndarray, live_ece: float, refits: int) -> None:
        """The confidence temperatures in use and the calibration seen on served traffic."""
        self._begin()
        self.temperature[: len(temperatures)] = temperatures
        self.live_ece[0], self.refits[0] = live_ece, refits
        self._end()

    # -- readers -----------------------------------------------------------
    @property
    def policy_name(self) -> str:
        return POLICIES[int(self.policy[0])]

    def calibration_error(self) -> float:
        """sum_k |predicted_k - accepted_k| / sum_k verified_k over verified slots (0 when none)."""
        total = self.verified.sum()
        if total == 0:
            return 0.0
        return float(np.abs(self.predicted - self.accepted).sum() / total)

    def skipped_fraction(self) -> float:
        """Share of engine steps in which the drafter did not run."""
        return 0.0 if self.steps[0] == 0 else float(1.0 - self.drafting_steps[0] / self.steps[0])


def read_stats(path: str | os.PathLike | None, retries: int = 100) -> EngineStats | None:
    """A consistent snapshot of an engine's counters, or None if there is none (yet)."""
    if not path:
        return None
    try:
        shared = np.memmap(path, dtype=np.float64, mode="r")
    except (OSError, ValueError):
        return None
    if shared.shape[0] < len(_HEADER):
        return None
    for _ in range(retries):
        before = shared[0]
        copy = np.array(shared)
        if before % 2 == 0 and shared[0] == before:
            snapshot = EngineStats(POLICIES[int(copy[2])], int(copy[1]))
            snapshot.array[:] = copy[: snapshot.array.shape[0]]
            return snapshot
        time.sleep(1e-4)  # a step is writing: try again
    return None


class DSparkCollector:
    """A Prometheus collector that reads the engine's counters at scrape time.

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

        stats = read_stats(self.path)
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
                fam.add_metric([str(k + 1)], float(v))
            yield fam

        info = GaugeMetricFamily("vllm:dspark_policy_info", "The DSpark verification policy in use",
                                 labels=["policy"])
        info.add_metric([stats.policy_name], 1)
        yield info

        # budget_buckets are already cumulative: bucket i counts steps with budget <= edge i.
        buckets = [(str(edge), float(count)) for edge, count in zip(BUDGET_BUCKETS, stats.budget_buckets)]
        buckets.append(("+Inf", float(stats.drafting_steps[0])))
        yield HistogramMetricFamily("vllm:dspark_verification_budget_tokens",
                                    "Draft tokens the policy sent to verification, per drafting step",
                                    buckets=buckets, sum_value=float(stats.budget_sum[0]))

        yield GaugeMetricFamily("vllm:dspark_calibration_error",
                                "Running |predicted - observed| accepted tokens per verified draft token",
                                value=stats.calibration_error())
        temperature = GaugeMetricFamily("vllm:dspark_confidence_temperature",
                                        "STS temperature applied to the confidence head, by draft position",
                                        labels=["position"])
        for k, t in enumerate(stats.temperature):
            temperature.add_metric([str(k + 1)], float(t))
        yield temperature
        yield GaugeMetricFamily("vllm:dspark_live_calibration_ece",
                                "Mean ECE of the predicted survival over the refinement window (NaN: not yet)",
                                value=float(stats.live_ece[0]))
        yield CounterMetricFamily("vllm:dspark_calibration_refits", "Online STS re-fits so far",
                                  value=float(stats.refits[0]))
        yield CounterMetricFamily("vllm:dspark_step_time_seconds",
                                  "Measured time of engine steps (target forward, verification, drafting)",
                                  value=float(stats.step_time_sum[0]))
        yield CounterMetricFamily("vllm:dspark_profiled_step_time_seconds",
                                  "Step time the engine cost model predicted for the same steps",
                                  value=float(stats.profiled_step_time_sum[0]))
        yield CounterMetricFamily("vllm:dspark_engine_steps", "Engine steps seen by the DSpark runner",
                                  value=float(stats.steps[0]))
        yield CounterMetricFamily("vllm:dspark_drafting_steps", "Engine steps in which the drafter ran",
                                  value=float(stats.drafting_steps[0]))
        yield GaugeMetricFamily("vllm:dspark_skipped_draft_step_fraction",
                                "Share of engine steps that skipped the drafter (break-even guard)",
                                value=stats.skipped_fraction())


_COLLECTOR: DSparkCollector | None = None


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def serve_metrics_from(path: str) -> None:
    """Register (once per process) the collector and point it at this engine's counters."""
    global _COLLECTOR
    atexit.register(_remove, path)
    if _COLLECTOR is None:
        from prometheus_client import REGISTRY

        _COLLECTOR = DSparkCollector()
        REGISTRY.register(_COLLECTOR)
    _COLLECTOR.point_at(path)
