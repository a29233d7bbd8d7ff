"""Train a DSpark drafter on a training-data directory (see data.py).

    from dspark_vllm.training.train import TrainConfig, train
    result = train(TrainConfig(data=DIR, target=TARGET, out=OUT, head="vanilla", steps=2000))
    # OUT/config.json + OUT/model.safetensors: a DeepSpec-format checkpoint

One optimiser step = `batch_size` sequences (per worker). For each sequence,
`num_anchors` anchors are drawn uniformly without replacement and all their
blocks go through one forward (blocks.py); `pack` sequences share a forward
(on a GPU, where many small forwards are launch-bound; the gradient is the
same). The loss is paper eq. 12 (loss.py).
The embedding and LM head are the target's, frozen. AdamW, linear warm-up then
cosine decay, gradient clipping.

Determinism and resume: the data order and the anchors of step s come from
generators seeded by (seed, step, rank, item), never from global RNG state, so
a run resumed from a checkpoint (model, optimiser, scheduler, RNG, step)
produces bit-identical weights to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn
from tqdm import tqdm

from ..model.checkpoint import save_checkpoint
from ..model.config import DSparkConfig, draft_config_for, explain_validation_error
from ..model.dspark import DSparkDraftModel
from ..model.dspark import init_draft
from .blocks import block_forward, block_labels, pack, sample_anchors
from .data import TrainingData
from .loss import AcceptanceStats, LossWeights, dspark_loss, warmup_cosine, weight_sum


class TrainConfig(BaseModel):
    """Everything a training run reads. `head="none"` is the DFlash ablation."""

    model_config = ConfigDict(extra="forbid")

    data: str
    target: str  # the target model: vocabulary, layer shapes, embedding and LM head
    out: str
    # draft architecture
    head: Literal["vanilla", "rnn", "none"] = "vanilla"  # Markov head type
    num_layers: int = Field(5, ge=1)
    block_size: int = Field(7, ge=1)
    markov_rank: int = 256
    target_layer_ids: list[int] | None = None  # default: all of the data's
    mask_token_id: int | None = None  # default: first unused id, else "<|mask|>"
    # loss (None: paper defaults 0.1 / 0.9 / 1.0; DFlash 1 / 0 / 0)
    gamma: float = 4.0
    ce_alpha: float | None = None
    l1_alpha: float | None = None
    confidence_alpha: float | None = None
    # optimisation
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(8, ge=1)  # sequences per step and worker
    num_anchors: int = Field(512, ge=1)  # blocks per sequence
    pack: int = Field(1, ge=1)  # sequences per forward (same gradient; fewer, larger kernels)
    lr: float = 6e-4
    warmup_steps: int | None = None  # default 4% of steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    init_std: float = 0.02
    seed: int = 42
    device: str = "cpu"
    # bookkeeping
    checkpoint_every: int = 500  # 0: only the final checkpoint
    keep_checkpoints: int = Field(2, ge=1)
    resume: bool = False
    stop_at: int | None = None  # stop after this step (checkpointed), e.g. for a time slot
    log_every: int = 10

    @model_validator(mode="after")
    def _check(self):
        if self.head != "none" and self.markov_rank < 1:
            raise ValueError(f"'markov_rank' must be >= 1 for head={self.head!r} "
                             f"(use head='none' for no Markov head).")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise ValueError(f"'stop_at' must be in 1..steps={self.steps}, got {self.stop_at}.")
        return self

    @classmethod
    def make(cls, **kw) -> "TrainConfig":
        """Like TrainConfig(**kw), with a one-line error naming the bad field."""
        try:
            return cls(**kw)
        except ValidationError as e:
            joint = "." if e.errors()[0]["loc"] else ": "  # a check across fields names them itself
            raise ValueError(f"TrainConfig{joint}{explain_validation_error(e, cls.model_fields)}.") from None

    @property
    def loss_weights(self) -> LossWeights:
        dflash = self.head == "none"
        pick = lambda v, default, ablation: v if v is not None else (ablation if dflash else default)  # noqa: E731
        return LossWeights(ce=pick(self.ce_alpha, 0.1, 1.0), l1=pick(self.l1_alpha, 0.9, 0.0),
                           confidence=pick(self.confidence_alpha, 1.0, 0.0), gamma=self.gamma)


# fields a resumed run may change
RESUMABLE_CHANGES = ("resume", "stop_at", "checkpoint_every", "keep_checkpoints", "log_every")


# -- the drafter ------------------------------------------------------------------

def target_path(target: str) -> Path:
    if Path(target).is_dir():
        return Path(target)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(target, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))


def load_target_head(target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's input embedding and LM head, read straight from its safetensors."""
    from safetensors import safe_open

    root = target_path(target)
    index = root / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    found = {}
    for name in files:
        with safe_open(str(root / name), framework="pt") as f:
            for key in f.keys():
                if key.endswith("embed_tokens.weight") or key == "lm_head.weight":
                    found["lm_head" if key == "lm_head.weight" else "embed"] = f.get_tensor(key)
    if "embed" not in found:
        raise ValueError(f"target '{target}': no '*embed_tokens.weight' tensor in {files}; "
                         f"pass a Hugging Face causal LM folder (safetensors).")
    return found["embed"], found.get("lm_head", found["embed"])  # tied: lm_head = embedding


def default_mask_token_id(target: str, vocab_size: int) -> int:
    """DeepSpec's choice: the first id past the tokenizer's real tokens (an untrained row)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target)
    if len(tok) < vocab_size:
        return len(tok)
    mask = tok.convert_tokens_to_ids("<|mask|>")
    if isinstance(mask, int) and mask != tok.unk_token_id and mask is not None:
        return mask
    raise ValueError(f"mask_token_id: the target's tokenizer fills the whole vocabulary "
                     f"({vocab_size}) and has no '<|mask|>' token; pass --mask-token-id.")


def draft_config(cfg: TrainConfig, data: TrainingData) -> DSparkConfig:
    """The drafter's DeepSpec config: the target's Qwen3 config plus the DSpark keys."""
    from transformers import AutoConfig

    target_cfg = AutoConfig.from_pretrained(cfg.target).get_text_config()
    layer_ids = cfg.target_layer_ids or data.target_layer_ids
    missing = sorted(set(layer_ids) - set(data.target_layer_ids))
    if missing:
        raise ValueError(f"target_layer_ids {layer_ids}: layers {missing} are not in the data "
                         f"(it has {data.target_layer_ids}); pick a subset or regenerate the data.")
    if target_cfg.hidden_size != data.hidden_size:
        raise ValueError(f"target: hidden_size {target_cfg.hidden_size} but the data has "
                         f"{data.hidden_size}; train with the target the data was made with.")
    rank = 0 if cfg.head == "none" else cfg.markov_rank
    mask = cfg.mask_token_id if cfg.mask_token_id is not None else default_mask_token_id(
        cfg.target, target_cfg.vocab_size)
    return draft_config_for(target_cfg, block_size=cfg.block_size, num_layers=cfg.num_layers,
                            markov_rank=rank, target_layer_ids=layer_ids, confidence=cfg.head != "none",
                            head_type="vanilla" if cfg.head == "none" else cfg.head, mask_token_id=mask)


def init_trainable_draft(dcfg: DSparkConfig, embed: torch.Tensor, lm_head: torch.Tensor, seed: int,
                         std: float = 0.02) -> DSparkDraftModel:
    """DeepSpec's init (model.dspark.init_draft) with the target's embed / LM head frozen."""
    model = init_draft(dcfg, embed, lm_head, seed, std)
    model.embed_tokens.weight.requires_grad_(False)
    model.lm_head.weight.requires_grad_(False)
    return model


class BlockLoss(nn.Module):
    """Drafter + loss as one module, so that DDP sees the whole training forward."""

    def __init__(self, draft: DSparkDraftModel, weights: LossWeights):
        super().__init__()
        self.draft, self.weights = draft, weights

    def forward(self, input_ids, loss_mask, features, last_hidden, anchors, segments=None):
        pred = block_forward(self.draft, input_ids, loss_mask, features, last_hidden, anchors,
                             segments=segments)
        parts = dspark_loss(pred, self.weights)
        return parts.numerator, parts.accept, parts.mask


# -- data order and anchors: functions of (seed, step), so resume is exact ------------

def rng(*key: int) -> torch.Generator:
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(seed)


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, rank: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=rng(seed, rank, epoch, 0xDA7A)).tolist()


def step_items(local: list[int], batch: int, step: int, seed: int, rank: int) -> list[int]:
    """The sample indices of one step: consecutive slices of per-epoch shuffles."""
    out = []
    for j in range(batch):
        epoch, r = divmod(step * batch + j, len(local))
        out.append(local[epoch_order(len(local), seed, rank, epoch)[r]])
    return out


def trainable_samples(data: TrainingData, rank: int, world: int) -> list[int]:
    """This worker's disjoint slice of the samples that have at least one anchor."""
    ok = [i for i, (_, s) in enumerate(data.items) if s["length"] - s["answer_start"] >= 2]
    local = ok[rank::world]
    if not local:
        raise ValueError(f"data '{data.path}': {len(ok)} usable samples for {world} workers; "
                         f"make more data or use fewer workers.")
    return local


# -- checkpoints ----------------------------------------------------------------------

def checkpoint_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.out) / "checkpoints"


def checkpoints(cfg: TrainConfig) -> list[Path]:
    return sorted(checkpoint_dir(cfg).glob("step-*.pt"))


def save_training_state(cfg: TrainConfig, step: int, draft, opt, sched) -> None:
    state = {"step": step, "config": cfg.model_dump(), "model": draft.state_dict(),
             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state()}
    path = checkpoint_dir(cfg) / f"step-{step:08d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    for old in checkpoints(cfg)[:-cfg.keep_checkpoints]:
        old.unlink()


def load_training_state(cfg: TrainConfig, draft, opt, sched) -> int:
    """Restore the latest checkpoint; returns the number of steps already done."""
    latest = checkpoints(cfg)[-1]
    state = torch.load(latest, map_location=cfg.device, weights_only=False)
    for key, value in cfg.model_dump().items():
        if key not in RESUMABLE_CHANGES and state["config"].get(key) != value:
            raise ValueError(f"resume: {latest} was trained with {key}={state['config'].get(key)!r}, "
                             f"this run has {value!r}. Use the same setting, or a new out directory.")
    draft.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    np.random.set_state(state["numpy_rng"])
    return state["step"]


# -- the loop ----------------------------------------------------------------------------

@dataclass
class TrainResult:
    checkpoint: Path | None  # the DeepSpec-format checkpoint (None if stopped at stop_at)
    steps_done: int
    losses: list[float] = field(default_factory=list)  # per step of this call
    metrics: dict = field(default_factory=dict)  # last log window: loss, accept@k, tau


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _distributed():
        torch.distributed.all_reduce(x)
    return x


def gather_stats(stats: AcceptanceStats, device) -> AcceptanceStats:
    """Sum the acceptance statistics over workers (no-op in a single process)."""
    if _distributed():
        packed = torch.cat([stats.accept_sum, stats.count, torch.tensor([stats.tau_sum, stats.blocks],
                                                                         dtype=torch.float64)])
        packed = _all_reduce(packed.to(device)).cpu()
        K = stats.count.shape[0]
        stats.accept_sum, stats.count = packed[:K], packed[K:2 * K]
        stats.tau_sum, stats.blocks = float(packed[-2]), int(packed[-1])
    return stats


def train_step(runner, cfg: TrainConfig, data: TrainingData, items: list[int], step: int,
               rank: int, world: int, stats: AcceptanceStats) -> float:
    """Forward/backward of one step's sequences (gradient accumulation); returns the loss."""
    device = torch.device(cfg.device)
    samples = [data[i] for i in items]
    anchors = [sample_anchors(s.loss_mask, cfg.num_anchors, rng(cfg.seed, step, rank, j))
               for j, s in enumerate(samples)]
    # the normaliser is the global sum of position weights (all samples, all workers)
    den = sum(weight_sum(block_labels(s.input_ids, s.loss_mask, a, cfg.block_size).mask, cfg.gamma)
              for s, a in zip(samples, anchors))
    den = _all_reduce(torch.as_tensor(den, dtype=torch.float32, device=device))
    total = torch.zeros((), device=device)
    for i in range(0, len(samples), cfg.pack):
        last = i + cfg.pack >= len(samples)
        sync = contextlib.nullcontext() if last or not hasattr(runner, "no_sync") else runner.no_sync()
        p = pack(samples[i:i + cfg.pack], anchors[i:i + cfg.pack])
        with sync:
            num, accept, mask = runner(p.input_ids.to(device), p.loss_mask.to(device), p.features.to(device),
                                       p.last_hidden.to(device), p.anchors.to(device),
                                       None if p.segments is None else p.segments.to(device))
            (num * world / den).backward()  # DDP averages over workers
        total += num.detach()
        stats.add(accept, mask)
    return float(_all_reduce(total) / den)


def train(cfg: TrainConfig | dict, rank: int = 0, world_size: int = 1,
          wrap: Callable[[nn.Module], nn.Module] | None = None) -> TrainResult:
    """Train a drafter; rank 0 writes checkpoints and the final DeepSpec-format checkpoint.

    `wrap` turns the training module into its distributed form (Ray Train's
    prepare_model); rank / world_size pick this worker's slice of the data.
    """
    cfg = cfg if isinstance(cfg, TrainConfig) else TrainConfig.make(**cfg)
    data = TrainingData(cfg.data)
    if not cfg.resume and checkpoints(cfg):
        raise ValueError(f"out: {checkpoint_dir(cfg)} holds checkpoints of an earlier run; pass "
                         f"resume=True (--resume) to continue it, or use a new out directory.")
    dcfg = draft_config(cfg, data)
    draft = init_trainable_draft(dcfg, *load_target_head(cfg.target), seed=cfg.seed, std=cfg.init_std).to(cfg.device)
    feature_cols = feature_columns(data, dcfg)
    if feature_cols is not None:
        data = ColumnSelect(data, feature_cols)

    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(0.04 * cfg.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, cfg.steps))
    start = load_training_state(cfg, draft, opt, sched) if cfg.resume and checkpoints(cfg) else 0

    runner = BlockLoss(draft, cfg.loss_weights)
    runner = wrap(runner) if wrap is not None else runner
    local = trainable_samples(data, rank, world_size)
    end = cfg.stop_at or cfg.steps
    result = TrainResult(None, start)
    stats, window = AcceptanceStats(cfg.block_size), []
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc="train", disable=rank != 0)
    for step in bar:
        opt.zero_grad(set_to_none=True)
        items = step_items(local, cfg.batch_size, step, cfg.seed, rank)
        loss = train_step(runner, cfg, data, items, step, rank, world_size, stats)
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        result.losses.append(loss)
        window.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}")
        done = step + 1
        if done % cfg.log_every == 0 or done == end:
            result.metrics = {"step": done, "loss": sum(window) / len(window), "lr": sched.get_last_lr()[0],
                              **gather_stats(stats, cfg.device).summary()}
            if rank == 0:
                log_metrics(cfg, result.metrics)
            stats, window = AcceptanceStats(cfg.block_size), []
        if rank == 0 and ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == end):
            save_training_state(cfg, done, draft, opt, sched)
        if _distributed():
            torch.distributed.barrier()
    result.steps_done = end
    if end == cfg.steps:
        if rank == 0:
            save_checkpoint(draft, cfg.out, extra_config={"num_anchors": cfg.num_anchors})
        result.checkpoint = Path(cfg.out)
    return result


def log_metrics(cfg: TrainConfig, metrics: dict) -> None:
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    with open(Path(cfg.out) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")


# -- using a subset of the data's target layers --------------------------------------------

def feature_columns(data: TrainingData, dcfg: DSparkConfig) -> torch.Tensor | None:
    """Feature columns of the draft's target layers, or None if it uses all of the data's."""
    if list(dcfg.target_layer_ids) == data.target_layer_ids:
        return None
    d = data.hidden_size
    return torch.cat([torch.arange(d) + data.target_layer_ids.index(l) * d for l in dcfg.target_layer_ids])


class ColumnSelect:
    """A TrainingData view whose features keep only some target layers."""

    def __init__(self, data: TrainingData, cols: torch.Tensor):
        self.data, self.cols = data, cols

    def __getattr__(self, name):
        return getattr(self.data, name)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        s = self.data[i]
        s.features = s.features[:, self.cols]
        return s
