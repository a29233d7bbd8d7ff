"""The break-even guard: draft only where speculation beats plain decoding.

On synthetic cost curves (no engine): a flat curve drafts, a steep one skips
the drafter, and probing notices when speculation pays again. In a real
engine with the steep example profile of configs/, the drafter forward is
skipped and greedy output still equals plain decoding.
"""

from pathlib import Path

import pytest

from dspark_vllm.guard import BreakEvenGuard
from dspark_vllm.sps import StepCost, synthetic_profile

ROOT = Path(__file__).resolve().parents[1]


def cost(kind: str, requests: int = 1) -> StepCost:
    profile = synthetic_profile(kind, 512)
    return StepCost(profile, draft_s=profile.draft_seconds(requests))


def seen(tau: float, verified: float = 7.0) -> BreakEvenGuard:
    """A guard that has observed rounds emitting `tau` tokens per request."""
    guard = BreakEvenGuard()
    guard.observe(num_requests=4, num_verified=round(4 * verified), num_accepted=round(4 * (tau - 1)))
    return guard


def test_drafts_before_anything_is_measured():
    assert BreakEvenGuard().should_draft(1, cost("steep"))


def test_flat_curve_drafts_steep_curve_skips():
    # flat: a step costs 10 ms whatever B; a round 2.1 ms. 1.5 tokens per round pay for it.
    assert seen(tau=1.5).should_draft(1, cost("flat"))
    # steep: 10 ms + 1 ms per token. Verifying 7 drafts for 1.5 tokens does not pay...
    assert not seen(tau=1.5).should_draft(1, cost("steep"))
    # ...but 3 tokens per round do: (3 / 20.1 ms) > (1 / 11 ms).
    assert seen(tau=3.0).should_draft(1, cost("steep"))
    speculative, plain = seen(tau=3.0).rates(1, cost("steep"))
    assert speculative == pytest.approx(3.0 / (0.010 + 0.008 + 0.0021))
    assert plain == pytest.approx(1.0 / 0.011)


def test_load_enters_the_decision():
    """On the steep curve a batch of 64 pays 64 * 7 verified tokens: skip; alone it drafts."""
    guard = seen(tau=2.6)
    assert guard.should_draft(1, cost("steep", 1))
    assert not guard.should_draft(64, cost("steep", 64))


def test_measured_rates_decide_where_the_profile_is_wrong():
    """On a flat profile 64 requests with tau 2.7 should draft. Serving measures drafting
    steps at 64 requests emitting 2.7 tokens per request in 20 ms; plain decoding is not
    measured yet (the model says 10 ms), so the guard skips at once to measure it (a
    switch, a settling step, one measured step), finds 6 ms, and keeps skipping; alone,
    a request keeps drafting."""
    profile = synthetic_profile("flat", 1024)
    wide = StepCost(profile, draft_s=profile.draft_seconds(64))
    guard = seen(tau=2.7, verified=5.0)
    assert guard.should_draft(64, wide)
    for _ in range(10):
        guard.observe_step(64, verified=True, drafted=True, emitted=64 * 2.7, seconds=0.020)
    speculative, plain = guard.rates(64, wide)
    assert speculative == pytest.approx(64 * 2.7 / 0.020) and speculative > plain
    assert [guard.should_draft(64, wide) for _ in range(3)] == [False] * 3  # until plain is measured
    guard.observe_step(64, verified=True, drafted=False, emitted=64, seconds=0.006)  # a transition: ignored
    guard.observe_step(64, verified=False, drafted=False, emitted=64, seconds=0.018)  # settling: ignored
    assert guard.plain_rate == {}
    guard.observe_step(64, verified=False, drafted=False, emitted=64, seconds=0.006)
    assert guard.rates(64, wide) == pytest.approx((64 * 2.7 / 0.020, 64 / 0.006))
    decisions = [guard.should_draft(64, wide) for _ in range(2 * guard.probe_every)]
    assert decisions.count(True) == 3  # skip, probing at the end of the first cycle (the next is twice as long)
    assert guard.should_draft(1, StepCost(profile, draft_s=profile.draft_seconds(1)))  # another bucket: model
    # a measured plain rate is refreshed after refresh_steps decisions, not before
    guard.plain_rate[7] = 1.0  # (pretend plain is slow now: drafting pays)
    fresh = [guard.should_draft(64, wide) for _ in range(guard.probe_every)]
    assert all(fresh)
    guard.step += guard.refresh_steps
    assert [guard.should_draft(64, wide) for _ in range(guard.probe_every)].count(False) == 3


def test_prompt_tokens_are_taken_out_of_measured_steps():
    """Measured rates hold for the decoding requests alone: a measured step that carried
    tokens of other requests (a prefill chunk) has the profile's marginal cost of them,
    T(B + other) - T(B), taken out. On the steep curve (1 ms per token) a 512-token chunk
    costs about 512 ms, whichever way the step ran."""
    profile = synthetic_profile("steep", 2048)
    wide = StepCost(profile, draft_s=profile.draft_seconds(64))
    extra = wide.extra_seconds(64, 512)
    assert 0.4 < extra < 0.7  # 512 ms, to the profile's grid
    guard = seen(tau=2.7, verified=5.0)
    guard.observe_step(64, verified=False, drafted=False, emitted=64, seconds=0.006 + extra, other_s=extra)
    assert guard.plain_rate[7] == pytest.approx(1 / 0.006)


def test_a_clean_step_supersedes_steps_mostly_made_of_prefill():
    """A batch arriving at once passes its first buckets while long prompt chunks fill
    the steps; the profile underrates them, so those rates read low. They count only
    until the bucket has a step that is mostly decode work, which restarts its mean."""
    guard = seen(tau=4.0)
    # 60 requests drafting next to 3800 prompt tokens the profile puts at 10 of the 30 ms.
    guard.observe_step(60, verified=True, drafted=True, emitted=240, seconds=0.030, other_s=0.010)
    assert guard.spec_rate[6] == pytest.approx(240 / (60 * 0.020))
    guard.observe_step(60, verified=True, drafted=True, emitted=240, seconds=0.012)  # clean: restarts
    assert guard.spec_rate[6] == pytest.approx(240 / (60 * 0.012))
    guard.observe_step(60, verified=True, drafted=True, emitted=240, seconds=0.030, other_s=0.010)  # left out
    assert guard.spec_rate[6] == pytest.approx(240 / (60 * 0.012))
    # A small prompt chunk (under a quarter of the step by the profile) is still measured.
    guard.observe_step(60, verified=True, drafted=True, emitted=240, seconds=0.014, other_s=0.002)
    assert guard.spec_rate[6] == pytest.approx((240 / (60 * 0.012) + 240 / (60 * 0.012)) / 2)
    # Plain rates alike, and a left-out plain step does not count as a fresh measurement.
    guard.observe_step(60, verified=False, drafted=False, emitted=60, seconds=0.006)
    guard.step = 50
    guard.observe_step(60, verified=False, drafted=False, emitted=60, seconds=0.030, other_s=0.020)
    assert guard.plain_rate[6] == pytest.approx(1 / 0.006) and guard.plain_seen[6] == 0


def test_a_switch_and_the_step_after_it_measure_neither_way():
    """Switching ways costs two steps: the step that verifies the last round without
    drafting (or drafts without verifying), and the one after it, which runs slow
    (18-21 ms against 12-15 ms for the plain steps that follow, at 64 requests). A
    probe or a plain measurement therefore takes three steps, and measures the third."""
    guard = seen(tau=4.0)
    for _ in range(3):
        guard.observe_step(64, verified=True, drafted=True, emitted=256, seconds=0.040)
    guard.observe_step(64, verified=True, drafted=False, emitted=256, seconds=0.036)  # the switch
    guard.observe_step(64, verified=False, drafted=False, emitted=64, seconds=0.020)  # settling
    assert guard.plain_rate == {} and guard.spec_rate[7] == pytest.approx(4.0 / 0.040)
    guard.observe_step(64, verified=False, drafted=False, emitted=64, seconds=0.013)
    assert guard.plain_rate[7] == pytest.approx(1 / 0.013)
    guard.observe_step(64, verified=False, drafted=True, emitted=64, seconds=0.028)  # a probe's switch
    guard.observe_step(64, verified=True, drafted=True, emitted=64 * 6, seconds=0.030)  # settling
    assert guard.spec_rate[7] == pytest.approx(4.0 / 0.040)
    guard.observe_step(64, verified=True, drafted=True, emitted=64 * 6, seconds=0.030)
    assert guard.spec_rate[7] == pytest.approx((4.0 / 0.040 * 3 + 6.0 / 0.030) / 4)


def test_speculation_must_beat_plain_by_the_margin():
    """Measured drafting steps 5% faster per request than plain ones do not draft (the
    margin covers noise, switches and a batch's desynchronized tail); 20% faster do."""
    guard = seen(tau=4.0)
    wide = cost("flat", 64)
    guard.spec_rate[7], guard.plain_rate[7], guard.plain_seen[7] = 1.05 * 70.0, 70.0, 0
    assert not guard.should_draft(64, wide)
    guard.spec_rate[7] = 1.2 * 70.0
    assert guard.should_draft(64, wide)
    assert BreakEvenGuard(min_gain=0.0, tau=4.0, spec_rate={7: 1.05 * 70.0}, plain_rate={7: 70.0},
                          plain_seen={7: 0}).should_draft(64, wide)


def test_a_finished_prompt_is_not_decode_work():
    """other_token_count: a request whose prefill ends in this step samples (so it may
    draft) but its prompt chunk counts as other tokens; a decoding request brings one
    token plus the drafts it verifies."""
    from types import SimpleNamespace

    from dspark_vllm.vllm_integration import other_token_count

    out = SimpleNamespace(num_scheduled_tokens={"a": 8, "b": 1, "new": 300, "chunk": 500},
                          scheduled_spec_decode_tokens={"a": [5] * 7}, total_num_scheduled_tokens=809)
    assert other_token_count(out, ["a", "b", "new"]) == 299 + 500
    assert other_token_count(out, ["a", "b", "new", "chunk"]) == 299 + 499


def test_probing_resumes_drafting():
    guard = seen(tau=1.5)
    steep = cost("steep")
    cycles = [16, 32, 64, 128, 256, 256]  # each cycle that ends still skipping doubles the next, up to 256
    assert (guard.probe_every, guard.max_probe_every) == (cycles[0], cycles[-1])
    decisions = [guard.should_draft(1, steep) for _ in range(sum(cycles))]
    # skipped, except three probing steps in a row at the end of every cycle
    ends = [sum(cycles[: i + 1]) for i in range(len(cycles))]
    assert [i for i, d in enumerate(decisions) if d] == [end - k for end in ends for k in (3, 2, 1)]
    # the curve flattens (e.g. load fell on a padded engine): the next step drafts again...
    assert guard.should_draft(1, cost("flat"))
    # ...and a later skip spell starts with a short cycle again
    spell = [guard.should_draft(1, steep) for _ in range(guard.probe_every)]
    assert [i for i, d in enumerate(spell) if d] == [guard.probe_every - k for k in (3, 2, 1)]
    # every load bucket keeps its own cycle
    assert set(guard.skip_cycle) == {1} and not guard.should_draft(64, cost("steep", 64))
    assert guard.skip_cycle[7] == (1, guard.probe_every) and guard.skip_cycle[1] == (0, 2 * guard.probe_every)
    # on the steep curve, probes that find the text predictable again bring drafting back
    for _ in range(30):
        guard.observe(num_requests=1, num_verified=7, num_accepted=5)
    assert guard.tau > 5 and guard.should_draft(1, steep)


def hard_text_spell() -> BreakEvenGuard:
    """A guard that measured one request's hard text: rounds emitting 2 tokens (expected
    2 by the calibrated confidences) in 4 ms steps, against 2 ms plain steps. 500 tokens
    per second drafting is not 10% above plain's 500: it skips."""
    guard = BreakEvenGuard()
    for _ in range(10):
        guard.observe(1, num_verified=7, num_accepted=1, num_expected=1.0)
        guard.observe_step(1, verified=True, drafted=True, emitted=2, seconds=0.004)
    guard.plain_rate[1], guard.plain_seen[1] = 1 / 0.002, 0
    assert guard.rates(1, cost("flat")) == pytest.approx((500.0, 500.0))
    return guard


def test_a_probe_that_finds_predictable_text_ends_the_spell():
    """The measured drafting rate is a running mean over many steps, so a hard request
    starts a spell that its one-step probes could not end. A probe's round is judged by
    what the text now promises (its expected tokens per request against their running
    mean): the next request's easy text ends the spell at the probe, and the bucket's
    drafting rate takes the lift."""
    flat = cost("flat")
    guard = hard_text_spell()
    spell = [guard.should_draft(1, flat) for _ in range(guard.probe_every - 2)]
    assert spell == [False] * (guard.probe_every - 3) + [True]  # skipping, then the probe's first round
    guard.observe(1, num_verified=7, num_accepted=5, num_expected=4.5)  # its verification: 5.5 expected
    assert guard.expected[1] == pytest.approx(2.0 + 0.1 * 3.5)
    lift = 5.5 / guard.expected[1]
    assert guard.should_draft(1, flat) and 1 not in guard.skip_cycle  # the spell ends here
    assert guard.spec_rate[1] == pytest.approx(500.0 * lift)
    assert all(guard.should_draft(1, flat) for _ in range(2 * guard.probe_every))  # and stays ended


def test_a_probe_that_finds_the_same_text_keeps_skipping():
    """A probe whose round promises what the measured steps delivered changes nothing:
    the probe runs its steps and the spell goes on (a host where drafting does not pay
    keeps skipping, whatever a round expects)."""
    flat = cost("flat")
    guard = hard_text_spell()
    decisions = [guard.should_draft(1, flat) for _ in range(guard.probe_every - 2)]
    for _ in range(2):  # the probe's rounds are verified; they expect what the text gave
        guard.observe(1, num_verified=7, num_accepted=1, num_expected=1.0)
        decisions.append(guard.should_draft(1, flat))
    assert [i for i, d in enumerate(decisions) if d] == [guard.probe_every - k for k in (3, 2, 1)]
    assert not any(guard.should_draft(1, flat) for _ in range(2 * guard.probe_every - 3))  # the next cycle


def test_one_round_expectation_neither_starts_nor_stops_drafting_outside_a_spell():
    """Only a probe reads a round's expectation. While drafting pays, an unpredictable
    round does not stop it; while it does not, a predictable round does not prevent the
    spell from starting (the measured rates decide both)."""
    flat = cost("flat")
    guard = BreakEvenGuard()
    for _ in range(10):
        guard.observe(1, num_verified=7, num_accepted=4, num_expected=4.0)
        guard.observe_step(1, verified=True, drafted=True, emitted=5, seconds=0.004)
    guard.plain_rate[1], guard.plain_seen[1] = 1 / 0.002, 0
    guard.observe(1, num_verified=7, num_accepted=0, num_expected=0.1)  # a round expecting nothing
    assert guard.should_draft(1, flat)
    guard = hard_text_spell()
    guard.observe(1, num_verified=7, num_accepted=6, num_expected=6.0)  # a round expecting 7 tokens
    assert not guard.should_draft(1, flat)


@pytest.mark.slow
def test_engine_skips_the_drafter_on_a_steep_curve_and_stays_exact(fixture_paths, baseline, prompts):
    import dspark_vllm
    from vllm import LLM, SamplingParams

    from engine_utils import COMMON, assert_rounds_equal_dense, generate, generate_ids

    steep = ROOT / "configs" / "sps-steep-example.json"
    llm = LLM(model=fixture_paths["target"], **COMMON,
              **dspark_vllm.engine_kwargs(fixture_paths["dspark"], verification="sync", sps_profile=str(steep)))
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    outs = generate(llm, prompts, params)
    assert [tuple(o.outputs[0].token_ids) for o in outs] == generate_ids(baseline, prompts, params)
    [info] = llm.collective_rpc("dspark_info")
    metrics = {m.name: m.value for m in llm.get_metrics() if m.name.startswith("vllm:dspark_") and hasattr(m, "value")
               and not m.labels}
    steps = metrics["vllm:dspark_engine_steps"]
    # The random-weight drafter emits about 1.1 tokens per round: on a steep
    # curve it never pays, so the drafter runs only on probes.
    assert info["break_even_guard"] and 0 < info["draft_rounds"] < steps / 4
    assert metrics["vllm:dspark_drafting_steps"] == info["draft_rounds"]
    assert metrics["vllm:dspark_skipped_draft_step_fraction"] == pytest.approx(1 - info["draft_rounds"] / steps)
    # Only steps that verify a round take vLLM's speculative path; the others (and
    # prefill) run plain decoding's inputs and sampler.
    assert 0 < info["speculative_steps"] <= info["draft_rounds"]
    # Skipped steps only stash their draft context; a drafting round writes it with its
    # own (proposer.PendingContext). The last rounds still equal the dense reference,
    # which attends to every position of the text up to the anchor.
    assert info["draft_rounds"] <= info["context_writes"] < steps / 4
    [rounds] = llm.collective_rpc("dspark_last_round")
    assert assert_rounds_equal_dense(rounds, prompts, outs, fixture_paths) == len(prompts)
    # without the guard the same engine drafts in (nearly) every step
    del llm
    llm = LLM(model=fixture_paths["target"], **COMMON,
              **dspark_vllm.engine_kwargs(fixture_paths["dspark"], verification="sync", sps_profile=str(steep),
                                          break_even=False))
    assert generate_ids(llm, prompts, params) == generate_ids(baseline, prompts, params)
    [info] = llm.collective_rpc("dspark_info")
    steps = next(m.value for m in llm.get_metrics() if m.name == "vllm:dspark_engine_steps")
    assert not info["break_even_guard"] and info["draft_rounds"] >= steps - 2  # all but prefill steps
    assert info["speculative_steps"] >= steps - 2


def test_a_slow_first_step_does_not_set_the_rate():
    """The first decode step after a prefill is slow; the measured rate is the average of the
    first steps, not an exponential mean anchored at that one (which would still read 8.1
    after nine steps at 10 tokens per request-second)."""
    guard = BreakEvenGuard()
    guard.observe_step(64, verified=False, drafted=False, emitted=64, seconds=64 / (64 * 5.0))
    for _ in range(9):
        guard.observe_step(64, verified=False, drafted=False, emitted=64, seconds=64 / (64 * 10.0))
    assert guard.plain_rate[7] == pytest.approx(9.5)
    for _ in range(200):  # after 1 / smoothing samples the mean is exponential: it follows change
        guard.observe_step(64, verified=False, drafted=False, emitted=64, seconds=64 / (64 * 20.0))
    assert guard.plain_rate[7] == pytest.approx(20.0, rel=1e-6)
    assert guard.spec_rate == {}


def test_deferred_context_writes_leave_the_cache_as_step_by_step_writes():
    """PendingContext: steps stashed and written at once give the cache of one write
    per step, also where a slot is written twice (freed and reused in between), and
    whatever order the cache-update kernel applies its rows in."""
    import torch

    from dspark_vllm.proposer import PendingContext

    gen = torch.Generator().manual_seed(0)
    step_by_step, deferred = torch.zeros(64, 3), torch.zeros(64, 3)
    pending = PendingContext(max_tokens=10_000)
    for step in range(12):
        n = int(torch.randint(1, 9, (1,), generator=gen))
        slots = torch.randperm(20, generator=gen)[:n]  # distinct within a step, reused across steps
        features, positions = torch.randn(n, 3, generator=gen), torch.arange(n) + step
        step_by_step[slots] = features
        assert not pending.add(features, positions, slots)
    features, positions, slots = pending.take()
    assert pending.parts == [] and pending.num_tokens == 0
    assert len(features) == len(positions) == len(slots) > len(set(slots.tolist()) - {-1})
    written = slots >= 0  # the kernels skip negative slots
    assert len(set(slots[written].tolist())) == int(written.sum())  # one write per slot left
    for i in reversed(written.nonzero().flatten().tolist()):  # any order gives the same cache
        deferred[slots[i]] = features[i]
    assert torch.equal(deferred, step_by_step)
    assert PendingContext(max_tokens=5).add(torch.zeros(5, 3), torch.arange(5), torch.arange(5))  # full


def test_vllm_cache_update_skips_negative_slots():
    """What superseded_to_skip relies on, in the installed vLLM build's kernel."""
    import torch
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("checks vLLM's CPU kernel; CUDA's reshape_and_cache skips slot < 0 in its source")
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    for block_size in (16, 128):
        isa = _get_attn_isa(torch.bfloat16, block_size, 64)
        k_cache = torch.zeros(4, 2, block_size, 64, dtype=torch.bfloat16)
        v_cache = torch.zeros_like(k_cache)
        k, v = torch.randn(3, 2, 64, dtype=torch.bfloat16), torch.randn(3, 2, 64, dtype=torch.bfloat16)
        ops.cpu_attn_reshape_and_cache(k, v, k_cache, v_cache, torch.tensor([5, -1, block_size + 7]), isa)
        touched = [b for b in range(4) if k_cache[b].any() or v_cache[b].any()]
        assert touched == [0, 1]  # slot -1 would land in block 3 (or out of bounds)
