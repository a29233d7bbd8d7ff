"""Build a DSpark training-data directory: target-written answers + target features.

    python scripts/make_training_data.py --target Qwen/Qwen3-4B \
        --prompts prompts.jsonl[,more.jsonl] --out data/ [--max-prompts N] [--max-tokens N]
        [--temperature T] [--raw] [--ray-workers N]

The target regenerates an answer to the first turn of every prompt with vLLM,
then computes the drafter's features (see dspark_vllm/training/data.py for the
format). Rerunning with the same settings resumes an interrupted run.
"""

import argparse
import sys

from pydantic import ValidationError

from dspark_vllm.training.data import DataConfig, make_training_data


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="target model (HF folder or hub id)")
    ap.add_argument("--prompts", required=True, help="comma-separated JSONL files of {'turns': [...]}")
    ap.add_argument("--out", required=True, help="output directory (resumed if it exists)")
    ap.add_argument("--max-prompts", type=int)
    ap.add_argument("--max-tokens", type=int, default=2048, help="answer length limit")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--raw", action="store_true", help="raw text prompts, no chat template (base/code models)")
    ap.add_argument("--thinking", action="store_true", help="enable_thinking=True in the chat template")
    ap.add_argument("--target-layer-ids", help="comma-separated target layers (default: 5 spread out)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--shard-size", type=int, default=256, help="prompts per shard")
    ap.add_argument("--generator", choices=["vllm", "hf"], default="vllm")
    ap.add_argument("--ray-workers", type=int, default=0, help="Ray tasks (0: this process only)")
    return ap.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    try:
        cfg = DataConfig(
            target=a.target, prompts=a.prompts.split(","), out=a.out, max_prompts=a.max_prompts,
            max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed,
            chat_template=not a.raw, enable_thinking=a.thinking, dtype=a.dtype, shard_size=a.shard_size,
            generator=a.generator,
            target_layer_ids=[int(x) for x in a.target_layer_ids.split(",")] if a.target_layer_ids else None,
        )
    except ValidationError as e:
        err = e.errors()[0]
        sys.exit(f"error: --{str(err['loc'][0]).replace('_', '-')}: {err['msg']}")
    if a.ray_workers > 0:
        from dspark_vllm.training.ray_scale import make_training_data_ray

        out = make_training_data_ray(cfg, a.ray_workers)
    else:
        out = make_training_data(cfg)
    print(out)


if __name__ == "__main__":  # vLLM spawns processes: keep the entry point guarded
    main()
