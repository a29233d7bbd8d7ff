"""Scaling data generation and training out with Ray.

- Data: the prompt shards still missing are dealt round-robin to Ray tasks;
  each task runs the same generation + feature code (data.build_shards) into
  its own shard files, and the driver then merges the index from the shards.
- Training: Ray Train's TorchTrainer runs train.train on N workers; the model
  goes through ray.train.torch.prepare_model (DDP), each worker reads a
  disjoint slice of the samples, and rank 0 writes the checkpoints.

Both connect to a running Ray cluster if there is one (ray.init()), else start
a local one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .data import DataConfig, build_shards, missing_shards, prepare_dir, update_index
from .train import TrainConfig, TrainResult, train


def _ray():
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    return ray


def make_training_data_ray(cfg: DataConfig, num_workers: int) -> Path:
    """make_training_data with the missing shards spread over `num_workers` Ray tasks."""
    ray = _ray()
    header, _ = prepare_dir(cfg)
    todo = missing_shards(cfg, header)
    gpus = 1 if torch.cuda.is_available() else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus)(build_shards)
    parts = [todo[i::num_workers] for i in range(num_workers) if todo[i::num_workers]]
    ray.get([task.remote(cfg, part) for part in parts])
    update_index(Path(cfg.out), header)  # merge: the index lists every shard now present
    return Path(cfg.out)


def _train_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    result = train(TrainConfig.make(**config), rank=ctx.get_world_rank(),
                   world_size=ctx.get_world_size(), wrap=ray.train.torch.prepare_model)
    ray.train.report(result.metrics)


def train_ray(cfg: TrainConfig, num_workers: int) -> TrainResult:
    """train() on a Ray Train TorchTrainer with `num_workers` DDP workers (CPU unless CUDA)."""
    _ray()
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = Path(cfg.out).resolve()
    use_gpu = cfg.device.startswith("cuda")
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=cfg.model_dump(),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(name="dspark-train", storage_path=str(out / "ray")),
    )
    trainer.fit()
    metrics = read_metrics(out)
    steps = cfg.stop_at or cfg.steps
    return TrainResult(out if steps == cfg.steps else None, steps, [], metrics)


def read_metrics(out: Path) -> dict:
    """The last line rank 0 logged to OUT/metrics.jsonl."""
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []
    return json.loads(lines[-1]) if lines else {}
