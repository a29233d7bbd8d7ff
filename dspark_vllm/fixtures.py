"""Tiny offline models for tests, demos and benchmarks.

`make_target` trains a byte-level BPE tokenizer on the Python standard
library's own sources (present on every machine) and builds a small random
Qwen3 model around it; `make_draft` builds a DeepSpec-format DSpark drafter
for that target with random weights (its embedding and LM head are copies of
the target's, as DeepSpec does). Everything is seeded and offline.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

from .model.checkpoint import save_checkpoint
from .model.config import DSparkConfig, draft_config_for
from .model.dspark import DSparkDraftModel, init_draft

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def stdlib_files(limit: int | None = None) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))
    return files[:limit] if limit else files


def train_tokenizer(out: Path, vocab_size: int, files: list[Path]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(f) for f in files], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token=None,
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def make_target(out: str | Path, vocab_size: int = 512, hidden_size: int = 128, num_layers: int = 4,
                logit_scale: float = 20.0, seed: int = 0, files: list[Path] | None = None,
                dtype: torch.dtype | None = None):
    """A tiny Qwen3 target with a locally trained tokenizer, saved to `out` (in `dtype`;
    None: float32).

    `logit_scale` multiplies the random LM head so that the next-token
    distribution is peaked rather than near-uniform, like a real model's.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(out, vocab_size, files or stdlib_files(limit=120))
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=hidden_size // 4, max_position_embeddings=2048, tie_word_embeddings=False,
        rope_theta=10000.0, rms_norm_eps=1e-6,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), bos_token_id=None,
    )
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    if dtype is not None:
        model = model.to(dtype)
        model.config.dtype = dtype
    model.save_pretrained(out, safe_serialization=True)
    return model, tok


def init_draft_from_target(cfg: DSparkConfig, target_model, seed: int = 0, std: float = 0.02) -> DSparkDraftModel:
    draft = init_draft(cfg, target_model.get_input_embeddings().weight,
                       target_model.get_output_embeddings().weight, seed, std)
    if draft.confidence_head is not None:  # spread confidences so lengths vary
        with torch.no_grad():
            w = draft.confidence_head.proj.weight
            w.normal_(0.0, 2.0 / w.shape[1] ** 0.5)
    return draft


def make_draft(out: str | Path, target_model, dtype: torch.dtype | None = None, **kw) -> DSparkDraftModel:
    """A random drafter for `target_model` (draft_config_for's options), saved to `out` in
    `dtype` (None: float32)."""
    seed = kw.pop("seed", 0)
    cfg = draft_config_for(target_model.config, **kw)
    draft = init_draft_from_target(cfg, target_model, seed=seed)
    if dtype is not None:
        draft = draft.to(dtype)
    save_checkpoint(draft, out)
    return draft


def make_fixtures(out: str | Path, draft_kw: dict | None = None, dtype: torch.dtype | None = None,
                  **target_kw) -> dict[str, str]:
    """A random target (make_target's options) and a random drafter for it (draft_config_for's
    options; block 7 unless given), both saved in `dtype` (None: float32)."""
    out = Path(out)
    target, tok = make_target(out / "target", dtype=dtype, **target_kw)
    draft_kw = {"block_size": 7, **(draft_kw or {})}
    make_draft(out / "dspark", target, dtype=dtype, mask_token_id=tok.convert_tokens_to_ids("<|mask|>"), **draft_kw)
    return {"target": str(out / "target"), "dspark": str(out / "dspark")}
