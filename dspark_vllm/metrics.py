"""DSpark's serving metrics: what the scheduler decided and how it turned out.

The numbers travel on vLLM's own channels, once per engine step, so they reach
`/metrics` and `llm.get_metrics()` wherever the workers run (Ray included):

1. worker (TP rank 0, the rank that answers for the engine): `EngineStats`
   counts in private memory; recording a step is a few numpy additions. The
   runner attaches a copy of the counters (`snapshot()`, a plain list of about
   60 floats) to the step's ModelRunnerOutput, which vLLM's executor already
   sends to the engine core.
2. engine core: the scheduler's `StatsReport` keeps the latest snapshot and,
   when the step's SchedulerStats leave for a front end, turns it into a report
   (`take()`): counter increments since the previous report, the verification
   budget of each drafting step since then, and the current gauges. It rides in
   SchedulerStats (see `DSparkScheduler.update_from_output`).
3. front end (API server, or the `vllm.LLM` process): `DSparkPrometheus` adds
   the increments to Prometheus metrics named `vllm:dspark_*`.

Reports carry increments, not totals: with several API servers each step's
stats go to one of them, and with data parallelism several engines report to
one front end; added up in Prometheus, the counters are right either way.

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
step time the engine cost model predicted. With prompt lookup on, how many
drafting requests verified lookup's block instead of the drafter's.
"""

from __future__ import annotations

import numpy as np

from .config import POLICIES

BUDGET_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_HEADER = ("num_positions", "policy")
_SCALARS = ("steps", "drafting_steps", "budget_sum", "step_time_sum", "profiled_step_time_sum",
            "profiled_steps", "refits", "lookup_blocks", "live_ece")
_PER_POSITION = ("drafted", "verified", "accepted", "predicted", "temperature")
# Fields that only grow: reports carry their increments. The others are gauges.
COUNTERS = ("steps", "drafting_steps", "budget_sum", "step_time_sum", "profiled_step_time_sum",
            "profiled_steps", "refits", "lookup_blocks", "drafted", "verified", "accepted", "predicted")


def _layout(num_positions: int) -> dict[str, slice]:
    """Field name -> slice of the float64 array."""
    sizes = [(name, 1) for name in _HEADER + _SCALARS] + [(name, num_positions) for name in _PER_POSITION]
    out, start = {}, 0
    for name, n in sizes:
        out[name] = slice(start, start + n)
        start += n
    return out


class EngineStats:
    """Cumulative counters of one engine (the worker of TP rank 0), in one float64 array.

    One array so that a step's copy for the engine core is a single
    `tolist()`. Every field is a numpy view: `stats.verified[k]`, `stats.steps[0]`.
    """

    def __init__(self, policy: str, num_positions: int):
        self.layout = _layout(num_positions)
        self.array = np.zeros(max(s.stop for s in self.layout.values()))
        for name, where in self.layout.items():
            setattr(self, name, self.array[where])
        self.num_positions[0] = num_positions
        self.policy[0] = POLICIES.index(policy)
        self.temperature[:] = 1.0  # uncalibrated confidences are used as they are
        self.live_ece[0] = float("nan")  # no refinement window yet

    @classmethod
    def from_snapshot(cls, snapshot) -> "EngineStats":
        """The counters a `snapshot()` copied (in another process)."""
        stats = cls(POLICIES[int(snapshot[1])], int(snapshot[0]))
        stats.array[:] = snapshot
        return stats

    # -- writers (worker) ---------------------------------------------------
    def record_step(self, num_drafting: int, num_positions: int, budget: int,
                    seconds: float | None, profiled_seconds: float | None) -> None:
        """One engine step: how many requests drafted (0: the drafter did not run),
        the verification budget the policy set for their drafts, and the step's
        measured and predicted time."""
        self.steps[0] += 1
        if num_drafting:
            self.drafting_steps[0] += 1
            self.drafted[:num_positions] += num_drafting
            self.budget_sum[0] += budget
        if seconds is not None:
            self.step_time_sum[0] += seconds
        if profiled_seconds is not None:
            self.profiled_step_time_sum[0] += profiled_seconds
            self.profiled_steps[0] += 1

    def record_verification(self, verified: np.ndarray, accepted: np.ndarray,
                            predicted: np.ndarray | None) -> None:
        """Per-position counts of one verification step (arrays of length num_positions)."""
        self.verified += verified
        self.accepted += accepted
        if predicted is not None:
            self.predicted += predicted

    def record_lookup(self, num_rows: int) -> None:
        """Drafting requests of one round that verify prompt lookup's block (lookup.py)."""
        self.lookup_blocks[0] += num_rows

    def record_calibration(self, temperatures: np.ndarray, live_ece: float, refits: int) -> None:
        """The confidence temperatures in use and the calibration seen on served traffic."""
        self.temperature[: len(temperatures)] = temperatures
        self.live_ece[0], self.refits[0] = live_ece, refits

    # -- readers -----------------------------------------------------------
    def snapshot(self) -> list[float]:
        """A copy for the engine core: plain Python floats, which every vLLM channel carries."""
        return self.array.tolist()

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

    def as_dict(self) -> dict:
        """Every field, exact (Prometheus readers such as llm.get_metrics() round counters)."""
        out = {"policy": self.policy_name, "calibration_error": self.calibration_error(),
               "skipped_fraction": self.skipped_fraction()}
        for name in _SCALARS + _PER_POSITION:
            value = getattr(self, name)
            out[name] = value.tolist() if name in _PER_POSITION else float(value[0])
        return out


class StatsReport:
    """Engine-core side: the worker's cumulative snapshots in, one report per stats message out.

    `observe` sees every step's snapshot, one step apart, so a rise of
    budget_sum between two of them is one step's verification budget (the
    histogram needs single observations). `take` runs only when a report
    actually leaves with the step's stats, and only then moves the baseline, so
    no increment is lost or sent twice.
    """

    def __init__(self):
        self.latest: EngineStats | None = None
        self._reported: np.ndarray | None = None  # counters as of the last report
        self._budgets: list[float] = []  # budget of each drafting step since the last report
        self._index: np.ndarray | None = None  # array positions of COUNTERS

    def observe(self, snapshot) -> None:
        """One step's snapshot (a copy into the array kept since the first one)."""
        stats = self.latest
        if stats is None or len(snapshot) != stats.array.shape[0]:
            stats = self.latest = EngineStats.from_snapshot(snapshot)
            self._index = self._reported = None
            drafting_before = budget_before = 0.0
        else:
            drafting_before, budget_before = float(stats.drafting_steps[0]), float(stats.budget_sum[0])
            stats.array[:] = snapshot
        new_drafting = int(stats.drafting_steps[0] - drafting_before)
        if new_drafting > 0:
            budget = float(stats.budget_sum[0]) - budget_before
            # More than one only for steps no output carried (warm-up): each gets their mean.
            self._budgets += [budget / new_drafting] * new_drafting

    def take(self) -> dict | None:
        """The report for the stats leaving now (None before the first snapshot)."""
        stats = self.latest
        if stats is None:
            return None
        if self._index is None:
            self._index = np.concatenate([np.arange(stats.layout[n].start, stats.layout[n].stop)
                                          for n in COUNTERS])
        now = stats.array[self._index]
        delta = now if self._reported is None else now - self._reported
        if (delta < 0).any():  # the worker's counters restarted
            delta = now
        self._reported = now
        budgets, self._budgets = self._budgets, []
        counters, start = {}, 0
        for name in COUNTERS:
            n = stats.layout[name].stop - stats.layout[name].start
            part = delta[start:start + n]
            counters[name] = part.tolist() if name in _PER_POSITION else float(part[0])
            start += n
        return {"policy": stats.policy_name, "counters": counters, "budgets": budgets,
                "temperature": stats.temperature.tolist(), "live_ece": float(stats.live_ece[0]),
                "calibration_error": stats.calibration_error(), "skipped_fraction": stats.skipped_fraction()}


# Prometheus names of the counters (per position ones carry a `position` label).
_PER_POSITION_COUNTERS = {
    "drafted": ("vllm:dspark_drafted_tokens", "Draft tokens proposed, by draft position"),
    "verified": ("vllm:dspark_verified_tokens", "Draft tokens sent to verification, by draft position"),
    "accepted": ("vllm:dspark_accepted_tokens", "Draft tokens accepted by verification, by draft position"),
    "predicted": ("vllm:dspark_predicted_accepted_tokens",
                  "Sum of calibrated survival predicted for verified draft tokens, by position"),
}
_SCALAR_COUNTERS = {
    "steps": ("vllm:dspark_engine_steps", "Engine steps seen by the DSpark runner"),
    "drafting_steps": ("vllm:dspark_drafting_steps", "Engine steps in which the drafter ran"),
    "step_time_sum": ("vllm:dspark_step_time_seconds",
                      "Measured time of engine steps (target forward, verification, drafting)"),
    "profiled_step_time_sum": ("vllm:dspark_profiled_step_time_seconds",
                               "Step time the engine cost model predicted for the same steps"),
    "refits": ("vllm:dspark_calibration_refits", "Online STS re-fits so far"),
    "lookup_blocks": ("vllm:dspark_prompt_lookup_blocks",
                      "Drafting requests whose round verified prompt lookup's block instead of the drafter's"),
}
_GAUGES = {
    "calibration_error": ("vllm:dspark_calibration_error",
                          "Running |predicted - observed| accepted tokens per verified draft token"),
    "live_ece": ("vllm:dspark_live_calibration_ece",
                 "Mean ECE of the predicted survival over the refinement window (NaN: not yet)"),
    "skipped_fraction": ("vllm:dspark_skipped_draft_step_fraction",
                         "Share of engine steps that skipped the drafter (break-even guard)"),
}
_PREVIOUS: list = []  # the metrics the last DSparkPrometheus registered in this process


class DSparkPrometheus:
    """The plugin's metrics in this process's Prometheus registry, fed by reports.

    Metric objects (not a collector read at scrape time) so that they also work
    in Prometheus' multiprocess mode, which vLLM uses with several API servers.
    Gauges are engine-wide values computed by the engine ("mostrecent" across
    processes); with data parallelism they are the last reporting engine's.
    """

    def __init__(self, policy: str, num_positions: int):
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        for metric in _PREVIOUS:  # an earlier engine of this process: its metrics give way
            try:
                REGISTRY.unregister(metric)
            except KeyError:
                pass  # vLLM's Prometheus logger already removed it
        _PREVIOUS.clear()
        positions = [str(k + 1) for k in range(num_positions)]

        def keep(metric):
            _PREVIOUS.append(metric)
            return metric

        self.per_position = {}
        for field, (name, doc) in _PER_POSITION_COUNTERS.items():
            counter = keep(Counter(name, doc, labelnames=["position"]))
            self.per_position[field] = [counter.labels(position=p) for p in positions]
        self.scalars = {field: keep(Counter(name, doc)) for field, (name, doc) in _SCALAR_COUNTERS.items()}
        self.budget = keep(Histogram("vllm:dspark_verification_budget_tokens",
                                     "Draft tokens the policy sent to verification, per drafting step",
                                     buckets=BUDGET_BUCKETS))
        self.gauges = {field: keep(Gauge(name, doc, multiprocess_mode="mostrecent"))
                       for field, (name, doc) in _GAUGES.items()}
        temperature = keep(Gauge("vllm:dspark_confidence_temperature",
                                 "STS temperature applied to the confidence head, by draft position",
                                 labelnames=["position"], multiprocess_mode="mostrecent"))
        self.temperature = [temperature.labels(position=p) for p in positions]
        self.policy_info = keep(Gauge("vllm:dspark_policy_info", "The DSpark verification policy in use",
                                      labelnames=["policy"], multiprocess_mode="mostrecent"))
        self.policy_info.labels(policy=policy).set(1)

    def record(self, report: dict) -> None:
        """Add one report's increments and set its gauges."""
        counters = report["counters"]
        for field, children in self.per_position.items():
            for child, amount in zip(children, counters[field]):
                if amount > 0:
                    child.inc(amount)
        for field, counter in self.scalars.items():
            if counters[field] > 0:
                counter.inc(counters[field])
        for budget in report["budgets"]:
            self.budget.observe(budget)
        for field, gauge in self.gauges.items():
            gauge.set(report[field])
        for child, value in zip(self.temperature, report["temperature"]):
            child.set(value)
        self.policy_info.labels(policy=report["policy"]).set(1)
