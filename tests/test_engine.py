"""DSpark inside a real vLLM engine (the CPU, or CUDA with a CUDA vLLM build; see
engine_utils.py): exactness end to end.

Greedy: token-for-token equality with plain decoding. Sampling: the sampled
sequences follow the target's exact conditional distributions (computed with
Hugging Face transformers), with enough samples to see a 0.05 TV difference.
"""


import numpy as np
import pytest

from engine_utils import COMMON, exact_conditionals, expected_runner, generate_ids
from stats import ALPHA, sequence_gof_pvalue

pytestmark = pytest.mark.slow


def spec_counters(llm) -> dict:
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            out[m.name] = getattr(m, "values", None) or getattr(m, "value", None)
    return out


@pytest.fixture(scope="module")
def dspark(fixture_paths):
    import dspark_vllm
    from vllm import LLM

    return LLM(model=fixture_paths["target"], **dspark_vllm.engine_kwargs(fixture_paths["dspark"]), **COMMON)


def test_greedy_equals_plain_decoding(baseline, dspark, prompts):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    before = spec_counters(dspark)
    expected = generate_ids(baseline, prompts, params)
    got = generate_ids(dspark, prompts, params)
    assert got == expected
    after = spec_counters(dspark)
    assert after["vllm:spec_decode_num_draft_tokens"] > before.get("vllm:spec_decode_num_draft_tokens", 0)


def test_drafts_come_with_the_step_output(baseline, dspark, prompts):
    """The worker sends each round's drafts with the step's output, so the engine core
    never calls back for them (one round trip less per step), and the output is still
    plain decoding's."""
    from vllm import SamplingParams

    [info] = dspark.collective_rpc("dspark_info")
    before, fetches = spec_counters(dspark).get("vllm:spec_decode_num_draft_tokens", 0), info["draft_fetches"]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    assert generate_ids(dspark, prompts, params) == generate_ids(baseline, prompts, params)
    assert spec_counters(dspark)["vllm:spec_decode_num_draft_tokens"] > before  # drafts reached the scheduler
    [info] = dspark.collective_rpc("dspark_info")
    assert info["draft_fetches"] == fetches


def test_worker_runs_the_dspark_runner_and_shares_target_weights(dspark):
    """The fixture draft's embedding / LM head equal the target's: no second copy."""
    [info] = dspark.collective_rpc("dspark_info")
    assert info["runner"] == expected_runner()
    assert info["shared_with_target"] == ["embed_tokens", "lm_head"]


# At temperature 1 the random drafter is rarely right (the rejection path);
# at 2 both distributions flatten and hundreds of drafts are accepted.
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (1.0, 8, 0.9), (2.0, None, None)])
def test_sampling_matches_target_distribution(dspark, fixture_paths, prompts, temperature, top_k, top_p):
    from vllm import SamplingParams

    n, prompt = 3000, prompts[3]
    kw = {} if top_k is None else {"top_k": top_k, "top_p": top_p}
    params = SamplingParams(temperature=temperature, max_tokens=4, ignore_eos=True, **kw)
    before = spec_counters(dspark)
    samples = generate_ids(dspark, [prompt] * n, params)
    after = spec_counters(dspark)
    cond = exact_conditionals(fixture_paths["target"], prompt, top_k, top_p, temperature)
    assert sequence_gof_pvalue(samples, cond) > ALPHA
    drafted = after["vllm:spec_decode_num_draft_tokens"] - before.get("vllm:spec_decode_num_draft_tokens", 0)
    accepted = after["vllm:spec_decode_num_accepted_tokens"] - before.get("vllm:spec_decode_num_accepted_tokens", 0)
    assert drafted > n  # every request verified drafts
    if temperature >= 2:
        assert accepted > 300, (accepted, drafted)  # the acceptance path ran often


def test_the_sampling_test_detects_a_tv_of_0_05(fixture_paths, prompts):
    """The same test, at the same sample size, rejects a distribution 0.05 away in TV."""
    cond = exact_conditionals(fixture_paths["target"], prompts[3])
    rng = np.random.default_rng(0)
    p = cond(())
    worst = int(np.argsort(p)[len(p) // 2])  # shift mass to an unlikely token
    eps = 0.05 / (1 - p[worst])
    biased = (1 - eps) * p + eps * np.eye(len(p))[worst]
    samples = [(int(t),) for t in rng.choice(len(p), size=3000, p=biased / biased.sum())]
    assert sequence_gof_pvalue(samples, cond) < ALPHA
    exact = [(int(t),) for t in rng.choice(len(p), size=3000, p=p / p.sum())]
    assert sequence_gof_pvalue(exact, cond) > ALPHA


@pytest.fixture(scope="module")
def dspark_threshold_small_cache(fixture_paths):
    """Threshold policy, and a KV cache small enough that requests get preempted."""
    import dspark_vllm
    from vllm import LLM

    kwargs = dspark_vllm.engine_kwargs(fixture_paths["dspark"], verification="threshold", threshold=0.3)
    return LLM(model=fixture_paths["target"], **kwargs, **COMMON, num_gpu_blocks_override=20,
               block_size=32, per_request_spec_decode_metrics="detailed")


def test_threshold_varies_lengths_and_stays_exact_under_preemption(
        baseline, dspark_threshold_small_cache, prompts):
    from vllm import SamplingParams

    llm = dspark_threshold_small_cache
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [tuple(o.outputs[0].token_ids) for o in outs] == generate_ids(baseline, prompts, params)
    lengths = [o.outputs[0].spec_decode_metrics.per_step_drafted for o in outs]
    first_steps = {steps[0] for steps in lengths if steps}
    assert len(first_steps) > 1, lengths  # requests of one batch verified different lengths
    # The policy cut blocks short (vLLM itself pads resumed requests to 7 placeholders).
    assert sum(x < 7 for s in lengths for x in s) > sum(x == 7 for s in lengths for x in s)
    preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    assert preemptions > 0
