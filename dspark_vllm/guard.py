"""Break-even guard: draft only in steps where speculation is expected to pay.

A DSpark step costs a drafting round and a wider verification forward; it pays
when the tokens it emits per request outweigh that. The scheduler's policies
choose *how many* drafts to verify; the guard decides, before the drafter
runs, *whether to draft at all* this step, by comparing expected tokens per
second of the two ways to run the next step for the R requests in the batch:

    speculative  R * tau            / (T(R + R*v + other) + overhead + D(R))
    plain        R                  / (T(R + other)       + overhead)

T(B) is the profile's target forward at B tokens, D(R) a drafting round for R
requests (profiled, scaled by what serving measures), `overhead` the rest of a
step as measured on finished steps, `other` tokens of requests that do not
draft (prefill chunks). tau (tokens emitted per drafting request per round,
bonus included) and v (drafts verified per drafting request) are running means
over earlier verifications. While the guard skips, it drafts once every
`probe_every` steps so that tau follows the text; the batch size is read
fresh every step, so a change of load changes the decision at once.

Why it is lossless: the decision uses finished steps and the batch size only,
and is taken before this step's drafts exist. Verifying no draft (the request
decodes plainly) is exact, and on drafting steps the policy decides as before;
no decision ever depends on a draft token it judges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .sps import StepCost


@dataclass
class BreakEvenGuard:
    probe_every: int = 16  # while skipping, draft once every this many steps
    smoothing: float = 0.1  # weight of a new observation in the running means
    tau: float | None = None  # tokens emitted per drafting request per round (None: not seen yet)
    verified: float = 0.0  # drafts verified per drafting request per round
    skipped_in_a_row: int = 0

    def observe(self, num_requests: int, num_verified: int, num_accepted: int) -> None:
        """One verification step of `num_requests` requests that had drafted."""
        if num_requests <= 0:
            return
        tau = 1.0 + num_accepted / num_requests
        verified = num_verified / num_requests
        if self.tau is None:
            self.tau, self.verified = tau, verified
        else:
            self.tau += self.smoothing * (tau - self.tau)
            self.verified += self.smoothing * (verified - self.verified)

    def rates(self, num_requests: int, other_tokens: int, cost: StepCost) -> tuple[float, float]:
        """Expected tokens/s of (speculative, plain) for the next step."""
        R = num_requests
        b_spec = R + round(R * self.verified) + other_tokens
        t_spec, t_plain = cost.step_seconds(np.array([b_spec, R + other_tokens], dtype=np.int64)).tolist()
        t_plain -= cost.draft_s  # the plain step runs no drafter
        return R * (self.tau or 1.0) / t_spec, R / t_plain

    def should_draft(self, num_requests: int, other_tokens: int, cost: StepCost) -> bool:
        if self.tau is None:
            return True  # nothing measured yet: find out
        speculative, plain = self.rates(num_requests, other_tokens, cost)
        if speculative > plain or self.skipped_in_a_row + 1 >= self.probe_every:
            self.skipped_in_a_row = 0
            return True
        self.skipped_in_a_row += 1
        return False
