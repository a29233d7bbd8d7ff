"""Fit Sequential Temperature Scaling (STS) for a DSpark drafter on held-out prompts.

    python scripts/calibrate.py --target T --draft D --prompts FILE.jsonl \
        --out calibration.json [--plot reliability.png] [--raw] \
        [--max-prompts 64] [--max-tokens 256] [--temperature 0]

Self-contained: Hugging Face transformers + the drafter in plain PyTorch, no vLLM.
For each prompt (first turn of `{"turns": [...]}` records, chat template unless
--raw):
  1. the target writes a continuation (greedy at temperature 0, else sampled
     at that temperature, no top-k/top-p);
  2. one target forward over prompt + continuation gives the drafter's context
     features (layers `target_layer_ids`);
  3. every answer token is taken as an anchor (one drafting round each, batched):
     the drafter drafts a block from the features strictly before the anchor,
     exactly as in serving, and we record its confidence logits z_1..z_K;
  4. each round's prefix survival S_k is measured:
     - temperature 0: slot k survives iff drafts 1..k equal the target's greedy
       continuation, i.e. the text itself (S_k = prefix-match indicator). Slots
       past the end of the text are unobserved (masked) unless an earlier slot
       already failed.
     - temperature T > 0: S_k = prod_{j<=k} min(1, p_j(d_j) / q_j(d_j)), the
       exact probability that speculative sampling keeps drafts 1..k, with q the
       drafter's distribution and p the target's at temperature T, both
       conditioned on the drafted prefix (one extra target forward per round,
       over the anchor's context plus its drafts). A soft label: the
       expectation of the accept/reject outcome, without its sampling noise.
Then STS is fitted (dspark_vllm.calibration.fit_sts), the temperatures and the
metrics are written to --out, and a reliability diagram to --plot.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from dspark_vllm.calibration import (calibration_from_fit, cumulative_survival, fit_sts,
                                     reliability_diagram, save_calibration)
from dspark_vllm.model.checkpoint import TargetInfo, load_draft_model, validate_checkpoint
from dspark_vllm.model.config import DSparkConfigError
from dspark_vllm.prompts import load_turns, prompt_token_ids
from dspark_vllm.rollout import rollout


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="target model (HF folder or name)")
    ap.add_argument("--draft", required=True, help="DSpark draft checkpoint folder")
    ap.add_argument("--prompts", required=True, help='held-out JSONL of {"turns": [...]} records')
    ap.add_argument("--out", required=True, help="calibration JSON to write")
    ap.add_argument("--plot", default=None, help="reliability diagram PNG to write")
    ap.add_argument("--raw", action="store_true", help="feed the first turn as raw text (no chat template)")
    ap.add_argument("--max-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256, help="continuation length per prompt")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    ap.add_argument("--bins", type=int, default=15, help="ECE bins")
    ap.add_argument("--batch", type=int, default=32, help="drafting rounds per drafter forward")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def load_models(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype).to(args.device).eval()
    cfg = validate_checkpoint(args.draft, TargetInfo.from_hf_config(target.config))
    if not cfg.enable_confidence_head:
        raise DSparkConfigError(
            f"{args.draft}/config.json: 'enable_confidence_head' is false: this drafter has no "
            f"confidence head, so there is nothing to calibrate.")
    model = load_draft_model(args.draft, dtype=dtype, device=args.device)
    gen_eos = target.generation_config.eos_token_id
    gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]  # one id or a list of ids
    eos = {t for t in (tokenizer.eos_token_id, *gen_eos) if t is not None}
    eos = {int(x) for t in eos for x in (t if isinstance(t, list) else [t])}
    return tokenizer, target, model, eos


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    tokenizer, target, model, eos = load_models(args)
    turns = load_turns(args.prompts, limit=args.max_prompts)
    parts = []
    for i, turn in enumerate(turns):
        rounds = rollout(target, model, prompt_token_ids(tokenizer, turn, raw=args.raw), args.max_tokens,
                         args.temperature, eos, batch=args.batch)
        if rounds is not None:
            parts.append(rounds)
        print(f"[{i + 1}/{len(turns)}] {0 if rounds is None else len(rounds[0])} rounds",
              file=sys.stderr, flush=True)
    if not parts:
        print("calibrate.py: no drafting rounds (empty continuations?); raise --max-tokens",
              file=sys.stderr)
        return 1
    z, survival, observed = (np.concatenate(x) for x in zip(*parts))
    result = fit_sts(z, survival, observed, bins=args.bins)
    calibration = calibration_from_fit(
        result, num_rounds=len(z), draft_model=str(args.draft), target_model=str(args.target),
        temperature_sampling=args.temperature)
    save_calibration(calibration, args.out)
    if args.plot:
        reliability_diagram(cumulative_survival(z), cumulative_survival(z, result.temperatures),
                            survival, args.plot, observed, bins=args.bins,
                            title=f"STS on {Path(args.prompts).name} ({len(z)} rounds, "
                                  f"T_sample={args.temperature:g})")
    temps = ", ".join(f"{t:.3g}" for t in result.temperatures)
    print(f"calibrated {len(z)} rounds from {len(turns)} prompts: {result.summary()}; "
          f"temperatures [{temps}] -> {args.out}" + (f", {args.plot}" if args.plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
