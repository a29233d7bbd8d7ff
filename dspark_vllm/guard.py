"""Break-even guard: draft only in steps where speculation is expected to pay.

A DSpark step costs a drafting round and a wider verification forward; it pays
when the tokens it emits per request outweigh that. The scheduler's policies
choose *how many* drafts to verify; the guard decides, before the drafter
runs, *whether to draft at all* this step, by comparing expected tokens per
second of the two ways to run the next step for the R requests in the batch:

    speculative  R * tau / (T(R + R*v) + overhead + D(R))
    plain        R       / (T(R)       + overhead)

and drafts when speculative beats plain by more than `min_gain` (10%). The margin
is for what a step's rate does not see: the measured rates move by 10-20% from
step to step on shared cores, a switch costs two steps (below), and drafting
desynchronizes a batch (its requests accept at different rates, so fast ones
finish early and a batch that nobody refills ends in a tail of a few requests;
a step that barely pays across the whole batch makes the slowest requests
slower than plain decoding would).

T(B) is the profile's target forward at B tokens, D(R) a drafting round for R
requests (profiled, scaled by what serving measures), `overhead` the rest of a
step as measured on finished steps. Tokens of requests that do not draft
(prefill chunks) stay out of the decision: the step's own ones are already
processed, and the next step's, verified or not, cost the same whichever way
is chosen, so over a run they add the same time to both ways. Adding them to
both denominators (an earlier form of this guard) pulls the ratio towards
tau and makes drafting look cheap whenever a prompt has just arrived: the
guard then drafted at the step after a prefill and stopped at the next,
switching ways about one full-batch step in five under steady load. Measured
in the default engine (one engine, each guard alternated batch by batch, 10-20
rounds, against never drafting): 0.902 -> 0.954x under steady load at c=64,
0.929 -> 0.945x and 0.965 -> 0.990x for one batch of 64, and no change at 16
or 4 requests (0.990 / 0.986x, 1.521 / 1.518x).

tau (tokens emitted per drafting request per round, bonus included) and v
(drafts verified per drafting request) are running means over earlier
verifications. While the guard skips, it drafts `probe_steps` steps
in a row (a probe) at the end of every skip cycle so that tau follows the text. The
first cycle of a spell is `probe_every` steps; each cycle that ends still
skipping doubles the next, up to `max_probe_every`, so that where speculation
keeps losing (a compute-bound host under load) the probes, which cost what it
loses, fade to about 1% of steps. A step that drafts ends the spell. The batch
size is read fresh every step and every load bucket keeps its own cycle, so a
change of load changes the decision at once.

A change of text ends a spell too. The measured rates are running means over
many steps, so they mix the text's predictability into the hardware's speed:
one hard request (one by one, its drafts accepting 1-2 tokens a round) pulls
the drafting rate below the margin, and the spell it starts outlives it. A
probe's one measured step moves that mean by a tenth, so probes could not end
the spell, its cycles doubled, and the next requests, easy ones, decoded
plainly: 12-20% of the steps of 16-24 held-out prompts served one at a time
(`fixed` drafts in all), 3% of `sync`'s speed there by in-engine alternation
of the two guards. So a probe's round is judged by
what the text now promises: its expected tokens per request, 1 + the sum of
the calibrated survival of the drafts it verifies (`observe`'s
`num_expected`), against the running mean of the same expectation in the
bucket (the policy verifies fewer drafts under load). Where
that ratio lifts the measured drafting rate past the margin, the spell ends
and the bucket's drafting rate is rescaled by it. Only a probe reads it: a
spell still starts on the measured rates alone, so one unpredictable round
never stops drafting.

The profile cannot see everything that grows with the batch (attention over
long contexts, logits and sampling of every verified row), so the guard also
measures both ways directly: per power-of-two bucket of R, the tokens emitted
per request-second of drafting steps (they verify the previous round and draft
the next) and of plain steps (neither). Other tokens in a step (prefill chunks,
the prompt of a request whose prefill ends in it) are costed by the profile's
marginal T(B + other) - T(B) and taken out of a measured step. Under steady
arrivals nearly every step carries a prompt, so this is what lets the
measurements decide at high load. The profile underrates prefill (its forwards
attend over no context), so a step mostly made of other tokens is measured only
until its bucket sees a step that is not (`_mean`). Where the drafting
rate is known but the plain one is not, the guard skips until a plain step is
measured (at once: a new load level otherwise drafted up to `probe_every` steps on
the cost model's word); where the plain rate is older than `refresh_steps`, it
skips `probe_steps` steps in a row to measure it again (the profile plus a
constant overhead learned on wide drafting steps underrates it: at 64 requests
it predicted 13 ms for a plain step that takes 6.5 ms). A step that switches
ways (verifies without drafting, or drafts without verifying) measures neither,
and neither does the step after it: the first plain step after a drafting one
runs slow (18-21 ms against 12-15 at 64 requests here), so a switch costs two
steps and a probe or a plain measurement takes three.

Why it is lossless: the decision uses finished steps and the batch size only,
and is taken before this step's drafts exist (a probe's expectation is that of
a round already verified). Verifying no draft (the request
decodes plainly) is exact, and on drafting steps the policy decides as before;
no decision ever depends on a draft token it judges.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .sps import StepCost


def bucket(num_requests: int) -> int:
    """Power-of-two bucket: 1 -> 1, 2..3 -> 2, 4..7 -> 3, ..."""
    return int(num_requests).bit_length()


@dataclass
class BreakEvenGuard:
    probe_every: int = 16  # one probe (probe_steps drafting steps) ends the first skip cycle of this many steps
    probe_steps: int = 3  # a switch, a settling step, one measured step (see the module doc)
    min_gain: float = 0.1  # draft where speculation's expected rate beats plain's by more than this
    max_probe_every: int = 256  # skip cycles double up to this while speculation keeps losing
    smoothing: float = 0.1  # weight of a new observation in the running means
    refresh_steps: int = 1024  # re-measure plain decoding after this many decisions
    tau: float | None = None  # tokens emitted per drafting request per round (None: not seen yet)
    verified: float = 0.0  # drafts verified per drafting request per round
    step: int = 0  # decisions taken (the probe / explore cycle)
    spec_rate: dict[int, float] = field(default_factory=dict)  # bucket -> tokens / (request s), drafting
    plain_rate: dict[int, float] = field(default_factory=dict)  # bucket -> tokens / (request s), plain
    plain_seen: dict[int, int] = field(default_factory=dict)  # bucket -> decision count when last measured
    samples: dict[tuple[bool, int], int] = field(default_factory=dict)  # (drafting, bucket) -> steps measured
    skip_cycle: dict[int, tuple[int, int]] = field(default_factory=dict)  # bucket -> (steps into cycle, length)
    max_estimated_share: float = 0.25  # a step whose other tokens cost more (by the profile) is "mixed"
    clean: set[tuple[bool, int]] = field(default_factory=set)  # (drafting, bucket) with a clean sample
    settling: bool = False  # the last step switched ways: the next one measures neither
    expected: dict[int, float] = field(default_factory=dict)  # bucket -> mean expected tokens per request and round
    fresh_expected: float | None = None  # the round verified since the last decision, if any

    def _mean(self, table: dict[int, float], key: int, value: float, drafting: bool, clean: bool = True) -> bool:
        """Running mean: the plain average of the first 1 / smoothing samples, then exponential.
        (Starting the exponential mean at the first sample let one slow step, such as the
        first decode step after a prefill, set a bucket's rate for dozens of steps.)

        A mixed sample (a step mostly made of other requests' prompt tokens, whose cost
        is the profile's estimate, which underrates real prefill) counts only until the
        bucket has a clean one: the first clean sample restarts the mean and later mixed
        ones are left out. Without this, the prefill burst of a batch arriving at once
        set the rate of the buckets it passed through for the rest of the load level.
        Returns whether the sample counted."""
        sample = drafting, key
        if clean and sample not in self.clean:
            self.clean.add(sample)
            self.samples.pop(sample, None)
        elif not clean and sample in self.clean:
            return False
        n = self.samples[sample] = self.samples.get(sample, 0) + 1
        weight = max(1.0 / n, self.smoothing)
        table[key] = value if n == 1 else table[key] + weight * (value - table[key])
        return True

    def observe(self, num_requests: int, num_verified: int, num_accepted: int,
                num_expected: float | None = None) -> None:
        """One verification step of `num_requests` requests that had drafted; num_expected:
        the drafts they were expected to accept (the sum of the verified drafts' calibrated
        survival; None without a confidence head)."""
        if num_requests <= 0:
            return
        tau = 1.0 + num_accepted / num_requests
        verified = num_verified / num_requests
        if self.tau is None:
            self.tau, self.verified = tau, verified
        else:
            self.tau += self.smoothing * (tau - self.tau)
            self.verified += self.smoothing * (verified - self.verified)
        if num_expected is not None:
            key, expected = bucket(num_requests), 1.0 + num_expected / num_requests
            mean = self.expected.get(key)
            self.expected[key] = expected if mean is None else mean + self.smoothing * (expected - mean)
            self.fresh_expected = expected

    def observe_step(self, num_requests: int, verified: bool, drafted: bool, emitted: int, seconds: float,
                     other_s: float = 0.0) -> None:
        """A finished step of `num_requests` decoding requests: whether it verified a round
        and drafted one, tokens emitted, its time, and the profile's cost of the other
        tokens that shared it (`StepCost.extra_seconds`), which is taken out. A step that
        did only one of the two is a transition and measures neither way, nor does the
        step after it."""
        transition = verified != drafted
        settling, self.settling = self.settling, transition
        clean = other_s <= self.max_estimated_share * seconds
        seconds -= other_s
        if num_requests <= 0 or seconds <= 0 or transition or settling:
            return
        key = bucket(num_requests)
        table = self.spec_rate if drafted else self.plain_rate
        counted = self._mean(table, key, emitted / (num_requests * seconds), drafted, clean)
        if counted and not drafted:
            self.plain_seen[key] = self.step

    def rates(self, num_requests: int, cost: StepCost) -> tuple[float, float]:
        """Expected tokens/s of (speculative, plain) for the next step's R decoding requests
        alone: measured where known, else the cost model."""
        R = num_requests
        key = bucket(R)
        tau = self.tau or 1.0
        if key in self.spec_rate:
            t_spec = tau / self.spec_rate[key]
        else:
            t_spec = cost.seconds(R + round(R * self.verified))
        if key in self.plain_rate:
            t_plain = 1.0 / self.plain_rate[key]
        else:
            t_plain = cost.seconds(R) - cost.draft_s  # the plain step runs no drafter
        return R * tau / t_spec, R / t_plain

    def should_draft(self, num_requests: int, cost: StepCost) -> bool:
        if self.tau is None:
            return True  # nothing measured yet: find out
        self.step += 1
        key = bucket(num_requests)
        fresh, self.fresh_expected = self.fresh_expected, None
        speculative, plain = self.rates(num_requests, cost)
        if speculative <= plain * (1.0 + self.min_gain) and not self._probe_finds_gain(key, fresh, speculative, plain):
            return self._probe(key)
        self.skip_cycle.pop(key, None)  # speculation pays: a later skip spell starts short again
        if key in self.spec_rate:  # drafting measured here: is plain decoding too, and lately?
            if key not in self.plain_seen:
                return False  # never: measure it now
            if self.step - self.plain_seen[key] >= self.refresh_steps:
                return self.step % self.probe_every >= self.probe_steps  # explore: probe_steps plain steps
        return True

    def _probe_finds_gain(self, key: int, fresh: float | None, speculative: float, plain: float) -> bool:
        """In a skip spell, whether the round a probe just verified promises enough tokens
        (its expected tokens per request against their running mean) to lift the measured
        drafting rate past the margin; if so, that rate takes the lift (module doc)."""
        if key not in self.skip_cycle or fresh is None or not self.expected.get(key):
            return False
        lift = fresh / self.expected[key]
        if speculative * lift <= plain * (1.0 + self.min_gain):
            return False
        if key in self.spec_rate:
            self.spec_rate[key] *= lift
        return True

    def _probe(self, key: int) -> bool:
        """A skipped step, unless it is one of the last probe_steps of its skip cycle (a
        probe). A cycle that ends still skipping doubles the next one (up to max_probe_every)."""
        done, length = self.skip_cycle.get(key, (0, self.probe_every))
        done += 1
        probe = done > length - self.probe_steps
        if done == length:
            done, length = 0, min(2 * length, self.max_probe_every)
        self.skip_cycle[key] = (done, length)
        return probe
