"""Verification-length policies: how many of a request's drafts to verify.

A policy sees each request's per-slot confidences c_k (the confidence head's
STS-calibrated estimate that slot k survives given slots < k survived) and
returns a length per request. The survival of the whole prefix up to k is
a_k = prod_{j<=k} c_j.

Lossless rule (paper section 3.2.2 and Appendix A). Speculative sampling
stays exact for any verification length that is a stopping rule: the decision
"verify slot k" may depend on x_1..x_{k-1} (hence on c_1..c_k, since the
Markov confidence head reads the previous token) and on anything independent
of this block (other requests, earlier steps), but never on x_k itself, nor on
c_{k+1}, c_{k+2}, ... which are computed from x_k. A search that looks at the
whole block and then picks the best length leaks x_k into the decision for
slot k and biases the output (Appendix A: 0.7/0.3 becomes 0.85/0.15).

Policies, per engine step (`policy.lengths(confidences, max_len, num_reqs)`):
  fixed      verify all max_len slots.
  threshold  stop at the first slot whose a_k < threshold.
  sync       paper Algorithm 1: greedy admission by a, early stop (needs a profile).
  async      paper section 5.2: the number of slots to verify comes from the
             confidences of two steps ago (global search, no early stop); the
             slots themselves are the best ones by fresh a (needs a profile).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from .config import NEEDS_CONFIDENCES, POLICIES
from .model.config import DSparkConfigError
from .sps import SPSProfile


class VerificationPolicy(Protocol):
    """Policies run on the host in numpy: per step they handle a few hundred
    numbers, where each torch op would cost more than the arithmetic."""

    name: str

    def lengths(self, confidences: torch.Tensor | None, max_len: int, num_reqs: int,
                other_tokens: int = 0, profile: SPSProfile | None = None) -> torch.Tensor:
        """[num_reqs] int64 lengths in [0, max_len], on the CPU.

        confidences: [num_reqs, >= max_len] calibrated conditional c_k (None
        without a confidence head). other_tokens: tokens of the same forward
        pass the policy does not schedule (added to B). profile: the SPS table
        (sync/async), if not bound at construction.
        """
        ...


@dataclass
class FixedPolicy:
    """Verify the whole block (or num_speculative_tokens if smaller)."""

    name: str = "fixed"

    def lengths(self, confidences, max_len, num_reqs, other_tokens=0, profile=None):
        return torch.full((num_reqs,), max_len, dtype=torch.long)


@dataclass
class ThresholdPolicy:
    """Stop at the first slot whose cumulative survival prod_{j<=k} c_j < threshold."""

    threshold: float = 0.5
    name: str = "threshold"

    def lengths(self, confidences, max_len, num_reqs, other_tokens=0, profile=None):
        survival = prefix_survival(confidences, max_len, num_reqs, self.name)
        passes = (survival >= self.threshold).cumprod(-1)
        return torch.from_numpy(passes.sum(-1).astype(np.int64))


# ---------------------------------------------------------------- shared steps

def prefix_survival(confidences, max_len: int, num_reqs: int, policy: str) -> np.ndarray:
    """a[r, k] = prod_{j<=k} c[r, j] for the first max_len slots, float64 on the host.

    Confidences are clamped to [0, 1] (NaN -> 0), so a is non-increasing along
    each request (a float product with a factor <= 1 never grows).
    """
    if confidences is None:
        raise no_confidence_head(policy)
    if confidences.ndim != 2 or confidences.shape[0] != num_reqs or confidences.shape[1] < max_len:
        raise ValueError(
            f"confidences have shape {tuple(confidences.shape)}, expected ({num_reqs}, >= {max_len}) "
            "= (num_reqs, max_len)"
        )
    c = confidences[:, :max_len]
    if isinstance(c, torch.Tensor):  # the proposer passes float64 on the host: a view, no conversion op
        on_host = c.dtype == torch.float64 and c.device.type == "cpu"
        c = c.numpy() if on_host else c.detach().to("cpu", torch.float64).numpy()
    else:
        c = np.asarray(c, np.float64)
    return np.fmin(np.fmax(c, 0.0), 1.0).cumprod(-1)  # fmax maps NaN to 0; 2 us vs 12 for nan_to_num + clip


def candidates(survival: np.ndarray):
    """Draft slots with a > 0, best first: (a, request, slot), three 1-D arrays.

    Ties go to the shallower slot, then to the lower request index. So a
    slot's predecessor (same request, a >= its own) always comes first.
    """
    num_reqs = survival.shape[0]
    if num_reqs == 1:  # one request: its slots are already best first (a never grows along a block)
        a = survival[0, : np.count_nonzero(survival[0] > 0)]
        return a, np.zeros(len(a), np.int64), np.arange(len(a))
    a = survival.T.reshape(-1)  # slot-major: index = slot * num_reqs + request
    order = np.argsort(-a, kind="stable")  # stable: ties keep (slot, request) order
    order = order[: np.count_nonzero(a > 0)]  # a >= 0, so the zeros sort last
    return a[order], order % num_reqs, order // num_reqs


def admitted_lengths(req: np.ndarray, slot: np.ndarray, n: int, num_reqs: int) -> torch.Tensor:
    """Per-request lengths when the first n candidates are admitted.

    Checks that the admitted slots of every request are a prefix 0..len-1: a
    slot is admissible only after its predecessor. `candidates` guarantees it.
    """
    req, slot = req[:n], slot[:n]
    lengths = np.bincount(req, minlength=num_reqs)
    # A request's admitted slots are distinct, so they are 0..len-1 iff every one is below len.
    if not (slot < lengths[req]).all():
        raise RuntimeError("admitted slots are not a prefix of their block (non-monotone survival)")
    return torch.from_numpy(lengths.astype(np.int64))


def need_profile(bound: SPSProfile | None, given: SPSProfile | None, policy: str) -> SPSProfile:
    """The profile passed to this call, else the one bound at construction."""
    profile = given if given is not None else bound
    if not hasattr(profile, "sps_array"):  # an SPSProfile, or an sps.StepCost
        raise DSparkConfigError(
            f"verification={policy!r} needs an SPS profile (the engine's measured steps/s per batch "
            f"size, see dspark_vllm.sps); got {type(profile).__name__}. Profile the engine or load a "
            "profile file (option sps_profile), or use verification='fixed' or 'threshold'."
        )
    return profile


def batch_sps(profile: SPSProfile, num_reqs: int, other_tokens: int, num_candidates: int) -> np.ndarray:
    """SPS(B) after admitting 0, 1, ..., num_candidates drafts: B = num_reqs + other_tokens + n.

    Every request sends its anchor (bonus) row even when it verifies no draft.
    `other_tokens` are tokens of the same forward pass the scheduler does not
    control (e.g. prefill chunks); 0 gives the paper's objective.
    """
    return profile.sps_array(num_reqs + other_tokens + np.arange(num_candidates + 1))


# ---------------------------------------------------------------- paper Algorithm 1

@dataclass
class SyncPolicy:
    """Hardware-aware prefix scheduler, paper Algorithm 1, on fresh confidences.

    Candidates (r, j) are admitted one at a time in order of decreasing
    a_{r,j}. After n admissions, E[tokens] = R + (sum of the admitted a) and
    B = R + n, and Theta_n = E[tokens] * SPS(B). Admission stops at the first
    candidate that does not raise Theta (Theta_n <= Theta_{n-1}: until the
    break, Theta_best is always the previous Theta).

    Why it is lossless: slot (r, k) is admitted iff every prefix of the sorted
    list up to and including it raised Theta. That list prefix holds (r, k)
    and the candidates ranked above it: other requests' slots (independent
    of x_{r,k}) and slots (r, j < k), whose a uses only x_{r,<k}. Slots
    (r, j > k), whose a depends on x_{r,k}, rank below (r, k) and are looked
    at only after its admission is settled. So the decision for slot k never
    sees x_k. Without the break (argmax over the whole path) it would.

    The early stop finds the best n only when Theta is unimodal along the
    path; on a jagged SPS curve it can stop before a cliff it would have
    paid to cross (paper section 5.2; AsyncPolicy searches globally).
    """

    profile: SPSProfile | None = None
    name: str = "sync"

    def lengths(self, confidences, max_len, num_reqs, other_tokens=0, profile=None):
        profile = need_profile(self.profile, profile, self.name)
        survival = prefix_survival(confidences, max_len, num_reqs, self.name)
        a, req, slot = candidates(survival)
        tokens = num_reqs + np.concatenate([[0.0], a.cumsum()])  # E[tokens] after 0..N admissions
        theta = tokens * batch_sps(profile, num_reqs, other_tokens, len(a))
        raises = theta[1:] > theta[:-1]
        n = int(raises.cumprod().sum())  # admissions before the first non-improvement
        return admitted_lengths(req, slot, n, num_reqs)


# ---------------------------------------------------------------- paper section 5.2

def stale_budget(stale, stale_reqs: int, num_reqs: int, max_len: int,
                 profile: SPSProfile, other_tokens: int = 0) -> int:
    """Drafts to verify this step, from an earlier step's sorted survivals `stale`.

    The earlier batch's pool stands in for this one: with n_s = stale_reqs and
    F(m) = sum of the m best stale a (linear between integers), admitting k
    drafts for num_reqs = R requests is worth E[tokens] = R + (R / n_s) F(k n_s / R),
    i.e. the stale pool replicated to R requests. When R = n_s this is exactly
    the paper's stale objective R + (sum of the top-k stale a). Global search,
    no early stop: k = argmax_k E[tokens](k) * SPS(R + k) over 0..R*max_len,
    the smallest k on ties.
    """
    stale = np.asarray(stale, dtype=np.float64)
    k = np.arange(num_reqs * max_len + 1, dtype=np.float64)
    m = np.minimum(k * stale_reqs / num_reqs, len(stale))
    whole = np.floor(m).astype(np.int64)
    cum = np.concatenate([[0.0], stale.cumsum()])
    nxt = np.concatenate([stale, [0.0]])
    top_m = cum[whole] + (m - whole) * nxt[whole]
    tokens = num_reqs + num_reqs / stale_reqs * top_m
    theta = tokens * batch_sps(profile, num_reqs, other_tokens, num_reqs * max_len)
    return int(np.argmax(theta))


@dataclass
class AsyncPolicy:
    """Asynchronous prefix scheduler, paper section 5.2.

    Step t verifies K_t drafts in all: the K_t candidates with the best fresh
    a_{r,j} (a dynamic top-K over the sorted pool of `candidates`, so prefixes
    are respected). K_t comes from `stale_budget` on the confidences of step
    t - delay (delay=2 as in the paper: with zero-overhead scheduling the
    batch shape of step t is fixed while step t-1 still runs).

    Why it is lossless: K_t depends only on finished steps, never on this
    step's drafts. Given K_t, slot (r, k) is admitted iff fewer than K_t
    candidates rank above it, and those are other requests' slots and
    (r, j < k), as in SyncPolicy: x_{r,k} is never consulted. The global
    search without early stop is safe here because it only sees stale data.

    First `delay` steps (no history yet): K_t = R * max_len, every slot with
    a > 0 (the fixed full block). A budget from this step's confidences is
    not allowed (it would break the causal barrier).
    """

    profile: SPSProfile | None = None
    delay: int = 2
    name: str = "async"
    history: deque = field(default_factory=deque, repr=False)  # (sorted survivals, num_reqs) per step

    def budget(self, num_reqs: int, max_len: int, other_tokens: int = 0, profile=None) -> int:
        """K_t from the step `delay` calls ago; the full block before there is one."""
        profile = need_profile(self.profile, profile, self.name)
        if len(self.history) < self.delay:
            return num_reqs * max_len
        stale, stale_reqs = self.history[-self.delay]
        return stale_budget(stale, stale_reqs, num_reqs, max_len, profile, other_tokens)

    def lengths(self, confidences, max_len, num_reqs, other_tokens=0, profile=None):
        if num_reqs == 0:  # nothing drafted: no step to remember
            return torch.zeros(0, dtype=torch.long)
        budget = self.budget(num_reqs, max_len, other_tokens, profile)  # before looking at this step
        survival = prefix_survival(confidences, max_len, num_reqs, self.name)
        a, req, slot = candidates(survival)
        self.history.append((a, num_reqs))
        while len(self.history) > self.delay:
            self.history.popleft()
        return admitted_lengths(req, slot, min(budget, len(a)), num_reqs)

    def reset(self) -> None:
        """Forget the history (e.g. after the engine was idle for long)."""
        self.history.clear()


# ---------------------------------------------------------------- construction



def no_confidence_head(policy: str) -> DSparkConfigError:
    return DSparkConfigError(
        f"verification={policy!r} needs a draft checkpoint with a confidence head "
        "('enable_confidence_head': true in its config.json); use verification='fixed' for this draft."
    )


def check_policy(name: str, options: dict, confidence_head: bool | None = None) -> None:
    """Everything make_policy checks except the profile (usable before profiling).

    `confidence_head`: whether the draft checkpoint has one (None: unknown).
    """
    if name not in POLICIES:
        raise DSparkConfigError(
            f"verification={name!r} is not a known policy; choose one of {', '.join(POLICIES)}."
        )
    if confidence_head is False and name in NEEDS_CONFIDENCES:
        raise no_confidence_head(name)
    if name == "threshold":
        t = options.get("threshold", 0.5)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise DSparkConfigError(
                f"threshold={t!r}: the 'threshold' policy needs a survival threshold in [0, 1]."
            )
    if name == "async":
        d = options.get("async_delay", 2)
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise DSparkConfigError(
                f"async_delay={d!r}: the 'async' policy needs the age in steps (an int >= 1, paper: 2) "
                "of the confidences that set the verification budget."
            )


def make_policy(name: str, options: dict, profile: SPSProfile | None = None,
                confidence_head: bool | None = None) -> VerificationPolicy:
    """A policy by name. sync/async take their SPS profile here or, if it is
    measured later, per call (`lengths(..., profile=...)`); a call with
    neither raises."""
    check_policy(name, options, confidence_head)
    if profile is not None:
        need_profile(None, profile, name)
    if name == "fixed":
        return FixedPolicy()
    if name == "threshold":
        return ThresholdPolicy(float(options.get("threshold", 0.5)))
    if name == "sync":
        return SyncPolicy(profile)
    return AsyncPolicy(profile, delay=options.get("async_delay", 2))
