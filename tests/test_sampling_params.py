"""min_p and logit_bias under DSpark: exactly the distribution plain decoding samples.

vLLM 0.32 drops both whenever speculative decoding is on; the plugin puts vLLM's
processors back and applies them to drafts, target rows and bonus rows in vLLM's
order. Greedy output with a logit bias equals plain decoding with the same bias;
sampled output passes the chi-square test against the target's exact conditionals.
"""

import numpy as np
import pytest

from engine_utils import COMMON, exact_conditionals, generate_ids
from stats import ALPHA, sequence_gof_pvalue

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dspark(fixture_paths):
    import dspark_vllm
    from vllm import LLM

    llm = LLM(model=fixture_paths["target"], **dspark_vllm.engine_kwargs(fixture_paths["dspark"]), **COMMON)
    yield llm
    del llm


def accepted_tokens(llm) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens")


def biases_for(fixture_paths, prompt) -> dict[int, float]:
    """Ban the likeliest first token, and push a mid-ranked one up."""
    p = exact_conditionals(fixture_paths["target"], prompt)(())
    order = np.argsort(-p)
    return {int(order[0]): -100.0, int(order[len(order) // 8]): 4.0}


def test_greedy_with_logit_bias_equals_plain(baseline, dspark, fixture_paths, prompts):
    from vllm import SamplingParams

    bias = biases_for(fixture_paths, prompts[0])
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, logit_bias=bias)
    expected = generate_ids(baseline, prompts[:8], params)
    assert expected != generate_ids(baseline, prompts[:8], SamplingParams(temperature=0.0, max_tokens=48,
                                                                           ignore_eos=True))
    assert generate_ids(dspark, prompts[:8], params) == expected


@pytest.mark.parametrize("kind", ["min_p", "logit_bias"])
def test_sampling_with_min_p_or_logit_bias_matches_target(dspark, fixture_paths, prompts, kind):
    from vllm import SamplingParams

    n, prompt, temperature = 3000, prompts[3], 2.0  # at T=2 the random drafter's drafts often survive
    extra = {"min_p": 0.1} if kind == "min_p" else {"logit_bias": biases_for(fixture_paths, prompt)}
    params = SamplingParams(temperature=temperature, max_tokens=4, ignore_eos=True, **extra)
    before = accepted_tokens(dspark)
    samples = generate_ids(dspark, [prompt] * n, params)
    assert accepted_tokens(dspark) - before > 30  # the acceptance path ran, not only rejections
    cond = exact_conditionals(fixture_paths["target"], prompt, temperature=temperature, **extra)
    assert sequence_gof_pvalue(samples, cond) > ALPHA
    if kind == "min_p":  # the parameter really acted: tokens below the cut never appear
        first = cond(())
        assert {s[0] for s in samples} <= set(np.flatnonzero(first > 0).tolist())
        assert (first > 0).sum() < len(first) / 2
