"""Training and serving run the same drafter: the engine's paged drafting round
equals the dense reference (`proposer.draft_rounds`, the code path of training
and calibration) on the same checkpoint and inputs."""

import pytest

from engine_utils import COMMON, assert_rounds_equal_dense

pytestmark = pytest.mark.slow


def test_engine_round_equals_dense_reference(fixture_paths, prompts):
    import dspark_vllm
    from vllm import LLM, SamplingParams

    batch = [prompts[i] for i in (0, 4, 9)]  # different lengths in one batch
    llm = LLM(model=fixture_paths["target"], **dspark_vllm.engine_kwargs(fixture_paths["dspark"]), **COMMON)
    # One step: prefill, sample the first token (the anchor), draft a block from it.
    outs = llm.generate([{"prompt_token_ids": p} for p in batch],
                        SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    [rounds] = llm.collective_rpc("dspark_last_round")
    del llm
    assert sorted(r["anchor_position"] for r in rounds.values()) == sorted(len(p) for p in batch)
    assert assert_rounds_equal_dense(rounds, batch, outs, fixture_paths) == len(batch)
