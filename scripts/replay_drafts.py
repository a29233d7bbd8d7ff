"""Offline replay: how many tokens per step the drafter's greedy drafts and prompt lookup
(vLLM's `ngram` method) would emit along the target's own greedy answers, per request.

    python scripts/replay_drafts.py --target T --draft D --prompts P.jsonl --json OUT.json
        [--num-prompts 64] [--max-tokens 128] [--raw] [--ngram-min 2] [--ngram-max 4]
        [--calibration CAL.json] [--lookup-max-confidence 0.9] [--lookup-tokens 23]

No engine and no timing: the target (Hugging Face, float32) writes each greedy
answer; the drafter drafts at every anchor of it (the dense reference
`proposer.draft_rounds`, the rounds serving computes on the paged cache), and
prompt lookup proposes at the same anchors. A replay then walks each answer the
way greedy verification of the full block would: a step at anchor p emits the
draft's longest prefix that matches the answer, plus one token. Reported:

  tokens_per_step      per source: the DSpark drafts, prompt lookup (1 token where
                       it finds no match), the better of the two every step (an
                       oracle), and `dspark_with_lookup`: the choice serving makes
                       with the `prompt_lookup` option (dspark_vllm/lookup.py, a
                       rule that needs no look-ahead; it reads the drafter's
                       confidences, calibrated by --calibration as in serving;
                       lookup's blocks run up to --lookup-tokens, the engine's
                       num_speculative_tokens, default: the block size)
  ngram_match_rate     share of anchors where prompt lookup proposes anything
  per_request          DSpark's tokens per step of each answer (min, quartiles,
                       max) and the steps each needs: in a batch nobody refills,
                       the slowest request sets the batch's length

vLLM counts n-gram's tau over the steps where it drafted only; tokens_per_step
counts every step, which is what a step's cost buys.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))  # already there when run as a script; not when a test loads it
from bench_speed import load_prompts, pair_arguments  # noqa: E402


def parse_args(argv=None):
    ap = pair_arguments(argparse.ArgumentParser(description=__doc__,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    ap.add_argument("--ngram-min", type=int, default=2)
    ap.add_argument("--ngram-max", type=int, default=4)
    ap.add_argument("--calibration", default=None, help="STS calibration JSON of the confidences")
    ap.add_argument("--lookup-max-confidence", type=float, default=None,
                    help="prompt_lookup.max_confidence (default: the option's default)")
    ap.add_argument("--lookup-tokens", type=int, default=None,
                    help="num_speculative_tokens with prompt lookup: its blocks may run past the drafter's "
                         "(default: the block size)")
    return ap.parse_args(argv)


def prompt_lookup(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> np.ndarray:
    """vLLM's n-gram proposal: for the longest n in [min_n, max_n] whose last n tokens
    occur earlier in `tokens`, the (up to) k tokens after their earliest occurrence."""
    L = len(tokens)
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:L - 1], n)
        hits = np.flatnonzero((windows == tokens[L - n:]).all(axis=1))
        if hits.size:
            return tokens[hits[0] + n:hits[0] + n + k]
    return tokens[:0]


def matched(draft: np.ndarray, truth: np.ndarray) -> int:
    """Length of the longest prefix of `draft` that equals `truth`."""
    n = min(len(draft), len(truth))
    return int(np.cumprod(draft[:n] == truth[:n]).sum())


def replay(accepted: np.ndarray) -> tuple[int, int]:
    """(tokens, steps) of walking one answer: accepted[p] drafts survive at offset p."""
    p = steps = 0
    while p < len(accepted):
        p += min(int(accepted[p]), len(accepted) - p - 1) + 1
        steps += 1
    return len(accepted), steps


def main(argv=None):
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM

    from dspark_vllm.calibration import calibrated_logits, load_calibration
    from dspark_vllm.config import PromptLookupOptions
    from dspark_vllm.lookup import choose
    from dspark_vllm.model.checkpoint import load_draft_model
    from dspark_vllm.proposer import draft_rounds
    from dspark_vllm.training.target import target_features

    prompts = load_prompts(args.target, args.prompts, args.num_prompts, args.raw)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32)
    model = load_draft_model(args.draft, torch.float32)
    K = model.config.block_size
    W = max(K, args.lookup_tokens or K)  # lookup's longest block
    maps = load_calibration(args.calibration, K).maps if args.calibration else None
    options = PromptLookupOptions(**({} if args.lookup_max_confidence is None
                                     else {"max_confidence": args.lookup_max_confidence}))
    sources = ("dspark", "ngram", "oracle", "dspark_with_lookup")
    accepted = {s: [] for s in sources}
    matches = anchors_seen = 0
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            full = target.generate(ids, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                                   do_sample=False, pad_token_id=0)[0]  # one sequence: nothing to pad
        features, _ = target_features(target, full[None], model.config.target_layer_ids)
        P, tokens = len(prompt), full.numpy()
        anchors = torch.arange(P - 1, len(tokens) - 1)
        rounds = draft_rounds(model, features[0], full, anchors, num_tokens=K)
        drafts, confidences = rounds.tokens.numpy(), None
        if rounds.confidence_logits is not None:  # as serving's calibrated_confidences
            logits = rounds.confidence_logits.float().numpy()
            confidences = 1 / (1 + np.exp(-(calibrated_logits(logits, **maps) if maps else logits)))
        rows = {s: [] for s in sources}
        lookup, lengths = np.zeros((len(anchors), W), dtype=drafts.dtype), np.zeros(len(anchors), dtype=np.int64)
        for j, a in enumerate(anchors.tolist()):
            truth = tokens[a + 1:a + 1 + K]
            ngram = prompt_lookup(tokens[:a + 1], args.ngram_min, args.ngram_max, W)
            lookup[j, :len(ngram)], lengths[j] = ngram, len(ngram)
            d, n = matched(drafts[j], truth), matched(ngram[:K], truth)
            matches += len(ngram) > 0
            rows["dspark"].append(d)
            rows["ngram"].append(n)
            rows["oracle"].append(max(d, n))
        choice = choose(drafts, lookup, lengths, np.ones(len(anchors), dtype=bool), confidences,
                        options.max_confidence)
        for j, a in enumerate(anchors.tolist()):
            taken = choice.tokens[j, :choice.max_lengths[j]]
            rows["dspark_with_lookup"].append(matched(taken, tokens[a + 1:a + 1 + W]))
        anchors_seen += len(anchors)
        for s in sources:
            accepted[s].append(np.array(rows[s]))

    walks = {s: np.array([replay(a) for a in accepted[s]]) for s in sources}  # [requests, (tokens, steps)]
    tau = walks["dspark"][:, 0] / walks["dspark"][:, 1]
    steps = walks["dspark"][:, 1]
    out = {"target": args.target, "draft": args.draft, "prompts": args.prompts, "num_prompts": len(prompts),
           "max_tokens": args.max_tokens, "block_size": K, "ngram": [args.ngram_min, args.ngram_max],
           "calibration": args.calibration, "lookup_max_confidence": options.max_confidence, "lookup_tokens": W,
           "tokens_per_step": {s: float(w[:, 0].sum() / w[:, 1].sum()) for s, w in walks.items()},
           "ngram_match_rate": matches / anchors_seen,
           "per_request": {"dspark_tokens_per_step": {"min": float(tau.min()),
                                                      "quartiles": np.percentile(tau, [25, 50, 75]).tolist(),
                                                      "max": float(tau.max())},
                           "steps": {"mean": float(steps.mean()), "max": int(steps.max()), "min": int(steps.min())}}}
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out["tokens_per_step"]), f"ngram match rate {out['ngram_match_rate']:.2f}")
    print(json.dumps(out["per_request"]))


if __name__ == "__main__":
    main()
