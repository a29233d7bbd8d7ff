"""Build the tiny offline test models: DIR/target (Qwen3) and DIR/dspark (drafter).

    python scripts/make_fixtures.py --out DIR
"""

import argparse
import json

from dspark_vllm.fixtures import make_fixtures

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--vocab-size", type=int, default=512)
    args = ap.parse_args()
    print(json.dumps(make_fixtures(args.out, vocab_size=args.vocab_size), indent=2))
