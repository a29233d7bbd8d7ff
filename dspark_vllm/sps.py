"""Engine cost profile: measured target steps per second SPS(B) at batch size B,
and the drafter's time per round for R requests.

The hardware-aware scheduler (paper section 3.2.2) maximises expected tokens
per second, Theta = E[tokens] * SPS(B), where B is the number of tokens in the
verification forward pass; the break-even guard compares that with plain
decoding, which needs the same curve without the drafter. So a profile holds
the target forward alone (`table`) and the drafting round alone
(`draft_table`); `StepCost` adds them up, with the per-step overhead the
engine measures while serving. Measured once per engine configuration (the
runner times the engine at `measure_sizes(...)`) and cached on disk as JSON:

    {
      "version": 2,
      "model": "Qwen/Qwen3-4B",
      "hardware": "NVIDIA H200",
      "settings_key": "3f2a9c0d1b7e4a65",          # cache_key(model, hardware, settings)
      "settings": {"dtype": "bfloat16", ...},       # what the key hashes (informational)
      "created": "2026-01-01T12:00:00+00:00",
      "table": [{"tokens": 1, "sps": 61.2}, {"tokens": 2, "sps": 61.0}, ...],
      "draft_table": [{"requests": 1, "seconds": 0.0011}, ...]   # optional
    }

`table` is sorted by `tokens` (strictly increasing, each >= 1) and every `sps`
is > 0. Lookups keep the step shape of the real curve (see `SPSProfile.sps`).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .model.config import DSparkConfigError, explain_validation_error

PROFILE_VERSION = 2


class SPSPoint(BaseModel):
    """One measurement: a forward pass over `tokens` tokens runs `sps` times per second."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: int = Field(strict=True, ge=1)
    sps: float = Field(strict=True, gt=0, allow_inf_nan=False)


class DraftPoint(BaseModel):
    """One measurement: a drafting round for `requests` requests takes `seconds`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests: int = Field(strict=True, ge=1)
    seconds: float = Field(strict=True, gt=0, allow_inf_nan=False)


class SPSProfile(BaseModel):
    """A measured SPS(B) table (target forward only), the drafter's round time, and
    what they were measured on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[2] = PROFILE_VERSION
    model: str
    hardware: str
    settings_key: str
    settings: dict[str, Any] = Field(default_factory=dict)
    created: str
    table: list[SPSPoint] = Field(min_length=1)
    # Drafting round time by number of drafting requests; empty: unknown (counted as 0).
    draft_table: list[DraftPoint] = Field(default_factory=list)
    # "step": a batch costs what the next measured size costs (engines that pad
    # to buckets, e.g. CUDA graphs). "linear": step time interpolated between
    # measured sizes (eager engines, the CPU: no padding, so stairs between
    # sparse measurements would be artefacts that stop Algorithm 1 early).
    shape: Literal["step", "linear"] = "step"

    @model_validator(mode="after")
    def _sorted(self):
        for i in range(1, len(self.table)):
            prev, cur = self.table[i - 1].tokens, self.table[i].tokens
            if cur <= prev:
                raise ValueError(
                    f"table[{i}].tokens = {cur} is not greater than table[{i - 1}].tokens = {prev}: "
                    f"the table must be sorted by tokens with no duplicates"
                )
        for i in range(1, len(self.draft_table)):
            if self.draft_table[i].requests <= self.draft_table[i - 1].requests:
                raise ValueError(
                    f"draft_table[{i}].requests is not greater than draft_table[{i - 1}].requests: "
                    f"the draft table must be sorted by requests with no duplicates"
                )
        return self


    @property
    def max_tokens(self) -> int:
        return self.table[-1].tokens

    @functools.cached_property
    def _columns(self) -> tuple[np.ndarray, np.ndarray]:
        """The table as arrays (sizes, sps), built once: lookups run every engine step."""
        return (np.array([p.tokens for p in self.table], dtype=np.int64),
                np.array([p.sps for p in self.table], dtype=np.float64))

    def sps_many(self, tokens: torch.Tensor) -> torch.Tensor:
        """SPS at each batch size in `tokens` (int tensor) as float64, on the CPU.

        Between measured sizes (shape "step"): the value of the next measured size >= B. A
        batch of B tokens is padded to a bucket (a CUDA graph size, a kernel
        tile) and costs what that bucket costs, so the curve is a staircase
        and we never interpolate across a cliff. Shape "linear" (eager engines)
        interpolates step time instead. Below the first measured size: the
        first value.

        Beyond the last measured size: linear in time per step, 1/SPS, with the
        slope of the last measured segment (never negative: a noisy last segment
        is treated as flat). With a single measurement, time grows in proportion
        to B (the compute-bound assumption).
        """
        return torch.from_numpy(self.sps_array(tokens.to(device="cpu", dtype=torch.long).numpy()))

    def sps_array(self, b: np.ndarray) -> np.ndarray:
        """`sps_many` on int64 numpy arrays. The policies, the guard and the step accounting
        look it up several times per engine step: within the measured range, an index into
        the curve at every batch size, built once (3 us against 18 us for evaluating it)."""
        dense = self._dense
        if b.size and b.min() >= 0 and b.max() < len(dense):
            return dense[b]
        return self._curve(b)

    @functools.cached_property
    def _dense(self) -> np.ndarray:
        return self._curve(np.arange(self.max_tokens + 1))

    def _curve(self, b: np.ndarray) -> np.ndarray:
        sizes, sps = self._columns
        idx = np.minimum(np.searchsorted(sizes, b), len(sizes) - 1)
        inside = sps[idx]
        if self.shape == "linear" and len(sizes) > 1:
            lo = np.maximum(idx - 1, 0)
            t_lo, t_hi = 1.0 / sps[lo], 1.0 / sps[idx]
            span = np.maximum(sizes[idx] - sizes[lo], 1)
            frac = np.clip((b - sizes[lo]) / span, 0.0, 1.0)
            inside = 1.0 / (t_lo + frac * (t_hi - t_lo))
        t_last, b_last = 1.0 / sps[-1], float(sizes[-1])
        if len(sizes) > 1:
            slope = max(0.0, (t_last - 1.0 / sps[-2]) / (b_last - sizes[-2]))
        else:
            slope = t_last / b_last
        beyond = 1.0 / (t_last + slope * (np.maximum(b, b_last) - b_last))  # only read where b > b_last
        return np.where(b > b_last, beyond, inside)

    def sps(self, tokens: int) -> float:
        """SPS(B) for one batch size; see `sps_many`. (Every engine step looks up a few
        single sizes: a Python index into the dense curve, not a one-element array.)"""
        dense = self._dense
        if 0 <= tokens < len(dense):
            return float(dense[tokens])
        return float(self._curve(np.array([tokens], dtype=np.int64))[0])

    @functools.cached_property
    def _draft_columns(self) -> tuple[list[int], list[float]]:
        return [p.requests for p in self.draft_table], [p.seconds for p in self.draft_table]

    def draft_seconds(self, requests: int) -> float:
        """Time of one drafting round for `requests` requests: linear between measured
        counts, the first value below them, the last segment's slope beyond (0 if unknown)."""
        counts, seconds = self._draft_columns
        if not counts or requests <= 0:
            return 0.0
        if len(counts) == 1:
            return seconds[0] * max(1.0, requests / counts[0])
        i = min(max(bisect.bisect_left(counts, requests), 1), len(counts) - 1)
        r0, r1, s0, s1 = counts[i - 1], counts[i], seconds[i - 1], seconds[i]
        if requests <= r0:
            return s0
        return max(s0, s0 + (s1 - s0) * (requests - r0) / (r1 - r0))

    def summary(self) -> str:
        first, last = self.table[0], self.table[-1]
        draft = (f"; a drafting round {1000 * self.draft_seconds(1):.2f} ms for 1 request"
                 if self.draft_table else "")
        return (
            f"SPS profile of {self.model} on {self.hardware}: {len(self.table)} sizes, "
            f"{first.sps:.1f} steps/s at B={first.tokens} -> {last.sps:.1f} at B={last.tokens}{draft} "
            f"(settings {self.settings_key}, {self.created})"
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path


class ServingCorrections:
    """What the profile does not see, learned from finished steps (running means).

    `overhead_s`: per step, the measured forward (step time - drafting time + the
    gap to the previous step) minus the profile's T(B): scheduling, sampling,
    verification, bookkeeping. `draft_scale`: the measured / profiled drafting round.
    (What grows with the batch beyond the profile, e.g. attention over long
    contexts, the break-even guard measures directly; see guard.py.)
    """

    def __init__(self, smoothing: float = 0.1):
        self.smoothing = smoothing
        self.overhead_s = 0.0
        self.draft_scale = 1.0

    def _mean(self, old: float, new: float) -> float:
        return old + self.smoothing * (new - old)

    def observe(self, tokens: int, target_s: float, forward_s: float, draft_measured_s: float,
                draft_profiled_s: float) -> None:
        self.overhead_s = self._mean(self.overhead_s, max(0.0, forward_s - target_s))
        if draft_profiled_s > 0:
            self.draft_scale = self._mean(self.draft_scale, draft_measured_s / draft_profiled_s)


class StepCost:
    """SPS(B) of a speculative step: the profile's target forward at B tokens, plus the
    per-step overhead serving measured (`ServingCorrections`) and a drafting round.

    The runner knows how many requests draft this step; the policies see
    1 / (1/SPS_target(B) + overhead + draft_seconds).
    """

    def __init__(self, profile: SPSProfile, corrections: ServingCorrections | None = None, draft_s: float = 0.0):
        self.profile, self.corrections, self.draft_s = profile, corrections, max(0.0, draft_s)

    @property
    def overhead_s(self) -> float:
        return 0.0 if self.corrections is None else self.corrections.overhead_s

    def step_seconds(self, tokens: np.ndarray) -> np.ndarray:
        """Seconds of a step at each batch size (int64 array)."""
        return 1.0 / self.profile.sps_array(tokens) + self.overhead_s + self.draft_s

    def seconds(self, tokens: int) -> float:
        """`step_seconds` of one batch size."""
        return 1.0 / self.profile.sps(tokens) + self.overhead_s + self.draft_s

    def extra_seconds(self, base: int, extra: int) -> float:
        """The profile's marginal cost of `extra` more tokens in a forward of `base`."""
        if extra <= 0:
            return 0.0
        return max(0.0, 1.0 / self.profile.sps(base + extra) - 1.0 / self.profile.sps(base))

    def sps_array(self, tokens: np.ndarray) -> np.ndarray:
        return 1.0 / self.step_seconds(tokens)

    def sps(self, tokens: int) -> float:
        return 1.0 / self.seconds(tokens)


# ---------------------------------------------------------------- building, loading

def _validated(data: Any, source: str, json_text: bool = False) -> SPSProfile:
    try:
        if json_text:
            return SPSProfile.model_validate_json(data)
        return SPSProfile.model_validate(data)
    except ValidationError as e:
        raise DSparkConfigError(f"{source}: {explain_validation_error(e, SPSProfile.model_fields)}; "
                                "re-profile or fix the file.") from None


def make_profile(points, model: str, hardware: str, settings: dict, shape: str = "step",
                 draft_points=None) -> SPSProfile:
    """A profile from measurements: `points` is {tokens: sps} or [(tokens, sps), ...] of
    the target forward; `draft_points` {requests: seconds} of a drafting round."""
    pairs = sorted(dict(points).items())
    drafts = sorted(dict(draft_points or {}).items())
    return _validated(
        {
            "model": model,
            "hardware": hardware,
            "settings_key": cache_key(model, hardware, settings),
            "settings": settings,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "table": [{"tokens": int(b), "sps": float(s)} for b, s in pairs],
            "draft_table": [{"requests": int(r), "seconds": float(t)} for r, t in drafts],
            "shape": shape,
        },
        "measured SPS profile",
    )


def load_profile(path: str | Path, settings_key: str | None = None) -> SPSProfile:
    """Read and check a profile file; `settings_key`, if given, must match the file's."""
    path = Path(path)
    source = f"profile file {path}"
    if not path.is_file():
        raise DSparkConfigError(f"{source} does not exist; re-profile the engine or fix the path.")
    text = path.read_text()
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise DSparkConfigError(
            f"{source}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); re-profile or fix the file."
        ) from None
    profile = _validated(text, source, json_text=True)
    if settings_key is not None and profile.settings_key != settings_key:
        raise DSparkConfigError(
            f"{source}: settings_key is {profile.settings_key!r} but this engine's settings hash to "
            f"{settings_key!r} (it was measured under other settings); delete it to re-profile."
        )
    return profile


# ---------------------------------------------------------------- caching

def cache_key(model: str, hardware: str, settings: dict) -> str:
    """16 hex digits of sha256 over the canonical JSON of (model, hardware, settings).

    `settings` should hold every engine setting that changes step time: tensor
    parallel size, dtype, KV-cache dtype, max_num_batched_tokens, CUDA graph
    capture sizes / enforce_eager, attention backend, vLLM version, block size.
    """
    blob = json.dumps({"model": model, "hardware": hardware, "settings": settings, "version": PROFILE_VERSION},
                      sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_path(cache_dir: str | Path, model: str, hardware: str, settings: dict) -> Path:
    """`cache_dir/sps-<model>-<key>.json`, the model name made file-safe."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model.strip("/")).strip("_")[-60:] or "model"
    return Path(cache_dir) / f"sps-{slug}-{cache_key(model, hardware, settings)}.json"


# ---------------------------------------------------------------- measuring

def monotone_times(seconds: dict[int, float]) -> dict[int, float]:
    """Measured step times per size, made non-decreasing in the size.

    A bigger batch never takes less time, and timing noise only ever adds time
    (a preemption, another process's burst), never removes it. So where a bigger
    batch was measured faster, the smaller one's time was inflated: each size
    takes the fastest time measured at it or at any bigger size. (A running
    maximum from the left would do the opposite: one slow outlier at a small
    size would lift the whole curve above it, and Algorithm 1 would see a cost
    step that is not there.)
    """
    out, fastest = {}, float("inf")
    for size in sorted(seconds, reverse=True):
        fastest = min(fastest, seconds[size])
        out[size] = fastest
    return dict(sorted(out.items()))


def measure_sizes(max_num_batched_tokens: int, dense_upto: int = 32, growth: float = 1.25,
                  include=()) -> list[int]:
    """Batch sizes to measure: every B in 1..dense_upto, then geometric steps of
    `growth`, plus `include` (pass the CUDA graph capture sizes so that the
    staircase steps are measured where they really are), always ending at the max.
    """
    if max_num_batched_tokens < 1:
        raise DSparkConfigError(
            f"max_num_batched_tokens={max_num_batched_tokens}: need >= 1 to measure an SPS profile."
        )
    if growth <= 1.0:
        raise DSparkConfigError(f"growth={growth}: the geometric step must be > 1.")
    sizes = set(range(1, min(dense_upto, max_num_batched_tokens) + 1))
    b = float(max(dense_upto, 1))
    while b < max_num_batched_tokens:
        sizes.add(int(round(b)))
        b *= growth
    sizes.update(int(s) for s in include if 1 <= int(s) <= max_num_batched_tokens)
    sizes.add(max_num_batched_tokens)
    return sorted(sizes)


def synthetic_profile(kind: str = "steep", max_tokens: int = 512) -> SPSProfile:
    """A profile for tests. Target forward: 'flat': 100 steps/s at every size
    (memory-bound, verifying more is free); 'steep': 10 ms + 1 ms per token
    (compute-bound from the start), measured at `measure_sizes(max_tokens)`.
    A drafting round costs 2 ms + 0.1 ms per request in both."""
    if kind not in ("flat", "steep"):
        raise DSparkConfigError(f"kind={kind!r}: synthetic profiles are 'flat' or 'steep'.")
    step_ms = (lambda b: 10.0) if kind == "flat" else (lambda b: 10.0 + b)
    points = {b: 1000.0 / step_ms(b) for b in measure_sizes(max_tokens)}
    drafts = {r: (2.0 + 0.1 * r) / 1000.0 for r in measure_sizes(max_tokens, dense_upto=4, growth=2.0)}
    return make_profile(points, model=f"synthetic-{kind}", hardware="none", settings={"kind": kind},
                        draft_points=drafts)


__all__ = [
    "SPSPoint", "DraftPoint", "SPSProfile", "StepCost", "make_profile", "load_profile", "cache_key", "cache_path",
    "measure_sizes", "synthetic_profile", "PROFILE_VERSION",
]
