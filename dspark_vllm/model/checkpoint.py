"""Reading, checking and writing DeepSpec-format DSpark checkpoints.

A checkpoint is a folder with `config.json` and `model.safetensors` whose
tensor names are those of `DSparkDraftModel.state_dict()` (no `model.` prefix).
Everything is checked before any weight is loaded: names, shapes, and the fit
with the target model, so that a wrong checkpoint fails at start-up with a
message naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import DSparkConfig, DSparkConfigError, check_target_layer_ids
from .dspark import DSparkDraftModel

WEIGHTS_FILE = "model.safetensors"


def expected_shapes(cfg: DSparkConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint of this config must hold."""
    with torch.device("meta"):
        model = DSparkDraftModel(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


@dataclass(frozen=True)
class TargetInfo:
    """What the draft must agree with, read from the target's HF config."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int

    @classmethod
    def from_hf_config(cls, hf_config) -> "TargetInfo":
        text = getattr(hf_config, "get_text_config", lambda: hf_config)()
        return cls(int(text.vocab_size), int(text.hidden_size), int(text.num_hidden_layers))


def check_against_target(cfg: DSparkConfig, target: TargetInfo, source: str) -> None:
    if cfg.vocab_size != target.vocab_size:
        raise DSparkConfigError(
            f"{source}: 'vocab_size' is {cfg.vocab_size} but the target model's is "
            f"{target.vocab_size}. The draft shares the target's vocabulary: use a "
            f"draft trained for this target."
        )
    target_hidden = cfg.target_hidden_size or cfg.hidden_size
    if target_hidden != target.hidden_size:
        raise DSparkConfigError(
            f"{source}: 'hidden_size' (target feature width) is {target_hidden} but the "
            f"target model's hidden_size is {target.hidden_size}. Use a draft trained "
            f"for this target (or set 'target_hidden_size')."
        )
    check_target_layer_ids(cfg.target_layer_ids, target.num_hidden_layers, source)
    if cfg.num_target_layers is not None and cfg.num_target_layers != target.num_hidden_layers:
        raise DSparkConfigError(
            f"{source}: 'num_target_layers' is {cfg.num_target_layers} but the target model has "
            f"{target.num_hidden_layers} layers. Use a draft trained for this target."
        )
    if not 0 <= cfg.mask_token_id < cfg.vocab_size:
        raise DSparkConfigError(
            f"{source}: 'mask_token_id' {cfg.mask_token_id} is outside the vocabulary "
            f"[0, {cfg.vocab_size})."
        )


def check_num_speculative_tokens(cfg: DSparkConfig, num_speculative_tokens: int | None,
                                 prompt_lookup: bool = False) -> int:
    """Draft tokens a step may verify per request: at most the checkpoint's block size,
    or more with prompt lookup on, whose proposals may run past the drafter's block
    (the drafter then drafts its block_size and lookup up to num_speculative_tokens)."""
    if num_speculative_tokens is None:
        return cfg.block_size
    if num_speculative_tokens < 1 or (num_speculative_tokens > cfg.block_size and not prompt_lookup):
        raise DSparkConfigError(
            f"num_speculative_tokens={num_speculative_tokens} but the draft checkpoint's "
            f"'block_size' is {cfg.block_size}: a DSpark block drafts at most block_size "
            f"tokens. Set num_speculative_tokens between 1 and {cfg.block_size} (or leave "
            f"it unset to use the block size), or turn on additional_config['dspark']"
            f".prompt_lookup, whose blocks may run up to num_speculative_tokens."
        )
    return num_speculative_tokens


def check_weights(path: str | Path, cfg: DSparkConfig) -> None:
    """Every expected tensor is present with the right shape; nothing unknown."""
    file = Path(path) / WEIGHTS_FILE
    if not file.is_file():
        raise DSparkConfigError(
            f"draft_model: '{path}' has no {WEIGHTS_FILE}. Pass the folder of a "
            f"DeepSpec-format DSpark checkpoint."
        )
    want = expected_shapes(cfg)
    with safe_open(str(file), framework="pt") as f:
        have = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    missing = sorted(set(want) - set(have))
    if missing:
        raise DSparkConfigError(
            f"{file}: missing tensor(s) {missing[:4]}{' ...' if len(missing) > 4 else ''}. "
            f"The config ({cfg.num_hidden_layers} layers, markov_rank={cfg.markov_rank}, "
            f"enable_confidence_head={cfg.enable_confidence_head}) asks for them; the "
            f"checkpoint is incomplete or its config.json does not match its weights."
        )
    for name, shape in want.items():
        if have[name] != shape:
            raise DSparkConfigError(
                f"{file}: tensor '{name}' has shape {list(have[name])}, expected "
                f"{list(shape)} from config.json. The weights and config.json disagree."
            )
    unknown = sorted(set(have) - set(want))
    if unknown:
        raise DSparkConfigError(
            f"{file}: unexpected tensor(s) {unknown[:4]}: not part of a DSpark draft with "
            f"this config.json (check 'markov_head_type', 'markov_rank' and "
            f"'enable_confidence_head')."
        )


def validate_checkpoint(
    path: str | Path,
    target: TargetInfo | None = None,
    num_speculative_tokens: int | None = None,
    prompt_lookup: bool = False,
) -> DSparkConfig:
    """All start-up checks of a draft checkpoint; returns its config."""
    cfg = DSparkConfig.from_pretrained(path)
    source = str(Path(path) / "config.json")
    if target is not None:
        check_against_target(cfg, target, source)
    check_num_speculative_tokens(cfg, num_speculative_tokens, prompt_lookup)
    check_weights(path, cfg)
    return cfg


def load_draft_model(path: str | Path, dtype=torch.float32, device="cpu") -> DSparkDraftModel:
    cfg = DSparkConfig.from_pretrained(path)
    check_weights(path, cfg)
    from safetensors.torch import load_file

    with torch.device("meta"):
        model = DSparkDraftModel(cfg)
    state = load_file(str(Path(path) / WEIGHTS_FILE), device=str(device))
    model.load_state_dict(state, assign=True, strict=True)
    return model.to(dtype=dtype, device=device).eval()


def save_checkpoint(model: DSparkDraftModel, path: str | Path, extra_config: dict | None = None) -> None:
    """Write config.json + model.safetensors in DeepSpec's format."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(model.config.raw)
    cfg.update(extra_config or {})
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
