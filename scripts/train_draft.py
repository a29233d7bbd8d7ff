"""Train a DSpark drafter; writes a DeepSpec-format checkpoint the plugin loads.

    python scripts/train_draft.py --target Qwen/Qwen3-4B --data data/ --out ckpt/ \
        --head vanilla|rnn|none [--steps N --batch-size B --lr LR --resume --ray-workers N]

--head none trains the DFlash ablation (no Markov head, no confidence head,
cross-entropy only). Metrics (loss, accept@k, tau_probabilistic) go to
OUT/metrics.jsonl; periodic checkpoints to OUT/checkpoints/ (--resume continues).
"""

import argparse
import json
import sys

from dspark_vllm.training.train import TrainConfig, train


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True)
    ap.add_argument("--data", required=True, help="directory from make_training_data.py")
    ap.add_argument("--out", required=True)
    ap.add_argument("--head", choices=["vanilla", "rnn", "none"], default="vanilla")
    ap.add_argument("--num-layers", type=int, default=5)
    ap.add_argument("--block-size", type=int, default=7)
    ap.add_argument("--markov-rank", type=int, default=256)
    ap.add_argument("--target-layer-ids", help="comma-separated subset of the data's layers")
    ap.add_argument("--mask-token-id", type=int)
    ap.add_argument("--gamma", type=float, default=4.0, help="loss decay over block positions")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step (per worker)")
    ap.add_argument("--num-anchors", type=int, default=512, help="blocks per sequence")
    ap.add_argument("--pack", type=int, default=1,
                    help="sequences per forward: the same gradient, fewer launches (GPU: try 4; CPU: 1)")
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup-steps", type=int, help="default: 4%% of --steps")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--checkpoint-every", type=int, default=500)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--ray-workers", type=int, default=0, help="Ray Train DDP workers (0: this process only)")
    ap.add_argument("--save-dtype", choices=["float32", "bfloat16"], default="float32",
                    help="dtype of the final checkpoint's weights (bfloat16 halves its size)")
    return ap.parse_args(argv)


def main(argv=None):
    a = vars(parse_args(argv))
    workers = a.pop("ray_workers")
    save_dtype = a.pop("save_dtype")
    if a["target_layer_ids"]:
        a["target_layer_ids"] = [int(x) for x in a["target_layer_ids"].split(",")]
    try:
        cfg = TrainConfig.make(**{k: v for k, v in a.items() if v is not None})
    except ValueError as e:
        sys.exit(f"error: {e}")
    if workers > 0:
        from dspark_vllm.training.ray_scale import train_ray

        result = train_ray(cfg, workers)
    else:
        result = train(cfg)
    if save_dtype != "float32":
        import torch

        from dspark_vllm.model.checkpoint import load_draft_model, save_checkpoint

        model = load_draft_model(result.checkpoint, dtype=getattr(torch, save_dtype))
        save_checkpoint(model, result.checkpoint)
    print(json.dumps({"checkpoint": str(result.checkpoint), **result.metrics}, indent=2))


if __name__ == "__main__":
    main()
