"""Build tiny offline models with random weights: DIR/target (Qwen3) and DIR/dspark (drafter).

    python scripts/make_fixtures.py --out DIR [--vocab-size 512] [--hidden-size 128 --num-layers 4]
        [--draft-layers 2 --markov-rank 16 --target-layer-ids 0,1,2] [--dtype float32]

The tests' models by default. With larger sizes they measure what a step costs at
another model size (no tau: the drafter is random; README, "Would a larger target help?").
"""

import argparse
import json

import torch

from dspark_vllm.fixtures import make_fixtures

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    # Unset options keep make_target's / draft_config_for's defaults (the tests' models).
    ap.add_argument("--vocab-size", type=int, help="default 512")
    ap.add_argument("--hidden-size", type=int, help="the target's (and so the drafter's); default 128")
    ap.add_argument("--num-layers", type=int, help="the target's; default 4")
    ap.add_argument("--draft-layers", type=int, help="default 2")
    ap.add_argument("--markov-rank", type=int, help="default 16")
    ap.add_argument("--target-layer-ids", help="comma-separated; default: all but the last")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="of both checkpoints")
    args = ap.parse_args()
    given = lambda **kw: {k: v for k, v in kw.items() if v is not None}  # noqa: E731
    draft_kw = given(num_layers=args.draft_layers, markov_rank=args.markov_rank,
                     target_layer_ids=args.target_layer_ids and [int(x) for x in args.target_layer_ids.split(",")])
    target_kw = given(vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_layers=args.num_layers)
    dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
    print(json.dumps(make_fixtures(args.out, draft_kw=draft_kw, dtype=dtype, **target_kw), indent=2))
