"""Verification-length policies: how many of a request's drafts to verify.

A policy sees each request's per-slot confidences c_k (the confidence head's
estimate that slot k survives given slots < k survived) and returns a length
per request. Lossless rule: the decision to include slot k may depend on
c_1..c_k (which never look at x_k), so every policy here stops at the first
slot that fails its test (a stopping rule, paper section 3.2 / Appendix A).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .model.config import DSparkConfigError


class VerificationPolicy(Protocol):
    name: str

    def lengths(self, confidences: torch.Tensor | None, max_len: int, num_reqs: int) -> torch.Tensor:
        """[num_reqs] int lengths in [0, max_len]."""
        ...


@dataclass
class FixedPolicy:
    """Verify the whole block (or num_speculative_tokens if smaller)."""

    name: str = "fixed"

    def lengths(self, confidences, max_len, num_reqs):
        return torch.full((num_reqs,), max_len, dtype=torch.long)


@dataclass
class ThresholdPolicy:
    """Stop at the first slot whose cumulative survival prod_{j<=k} c_j < threshold."""

    threshold: float = 0.5
    name: str = "threshold"

    def lengths(self, confidences, max_len, num_reqs):
        if confidences is None:
            raise DSparkConfigError(
                "verification='threshold' needs a draft checkpoint with a confidence head "
                "('enable_confidence_head': true); use verification='fixed' for this draft."
            )
        survival = confidences[:, :max_len].float().cumprod(-1)
        passes = (survival >= self.threshold).long().cumprod(-1)
        return passes.sum(-1)


POLICIES = ("fixed", "threshold")


def make_policy(name: str, options: dict) -> VerificationPolicy:
    if name == "fixed":
        return FixedPolicy()
    if name == "threshold":
        t = options.get("threshold", 0.5)
        if not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise DSparkConfigError(
                f"threshold={t!r}: the 'threshold' policy needs a survival threshold in [0, 1]."
            )
        return ThresholdPolicy(float(t))
    raise DSparkConfigError(
        f"verification={name!r} is not a known policy; choose one of {', '.join(POLICIES)}."
    )
