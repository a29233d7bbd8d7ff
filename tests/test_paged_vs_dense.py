"""Training and serving run the same drafter: the engine's paged drafting round
equals the dense reference (`proposer.draft_rounds`, the code path of training
and calibration) on the same checkpoint and inputs."""

import pytest
import torch

from engine_utils import COMMON

pytestmark = pytest.mark.slow


def test_engine_round_equals_dense_reference(fixture_paths, prompts):
    import dspark_vllm
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    from dspark_vllm.model.checkpoint import load_draft_model
    from dspark_vllm.proposer import draft_rounds
    from dspark_vllm.training.target import target_features

    batch = [prompts[i] for i in (0, 4, 9)]  # different lengths in one batch
    llm = LLM(model=fixture_paths["target"], **dspark_vllm.engine_kwargs(fixture_paths["dspark"]), **COMMON)
    # One step: prefill, sample the first token (the anchor), draft a block from it.
    outs = llm.generate([{"prompt_token_ids": p} for p in batch],
                        SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    [rounds] = llm.collective_rpc("dspark_last_round")
    del llm

    target = AutoModelForCausalLM.from_pretrained(fixture_paths["target"], dtype=torch.float32).eval()
    draft = load_draft_model(fixture_paths["dspark"])
    for prompt, out in zip(batch, outs):
        # vLLM's engine adds a suffix to the user's request id.
        [served] = [r for k, r in rounds.items() if k == out.request_id or k.startswith(out.request_id + "-")]
        anchor = out.outputs[0].token_ids[0]
        assert served["anchor"] == anchor and served["anchor_position"] == len(prompt)
        text = torch.tensor(prompt + [anchor])
        features, _ = target_features(target, text[None], draft.config.target_layer_ids)
        dense = draft_rounds(draft, features[0], text, torch.tensor([len(prompt)]))
        assert dense.tokens[0].tolist() == served["tokens"]
        torch.testing.assert_close(torch.tensor(served["confidence_logits"]), dense.confidence_logits[0],
                                   atol=2e-3, rtol=1e-3)
