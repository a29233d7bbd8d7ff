"""Train the small real target model of the default model pair.

A Qwen3ForCausalLM (~4M parameters, bf16 safetensors ~8 MB) trained from
scratch on the `train` split of the Python standard library's own sources
(see `dspark_vllm/corpus.py`), with a byte-level BPE tokenizer trained on the
same split. The `heldout` and `calibration` splits are never trained on; the
held-out loss is measured at the end. Also writes the prompt files
(`{"turns": [code prefix]}` JSONL) of the three splits.

Plain PyTorch: AdamW, linear warm-up then cosine decay, bf16 autocast on the
CPU with fp32 master weights, packed token windows sampled at seeded random
offsets. A fixed number of steps (not a time limit), so a run is reproducible
for a given seed, thread count and Python version (the stdlib differs between
Python versions; training_info.json records the one used).

    python scripts/train_target.py --out dspark_vllm/assets/default_pair/target --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dspark_vllm import corpus
from dspark_vllm.fixtures import train_tokenizer

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "dspark_vllm" / "assets" / "default_pair" / "target"
# Calibration fits and held-out calibration numbers need many prompts: the rounds of one
# prompt share one continuation, so the prompt count sets their noise. The first 64 of
# each split are the same for any count (prompt_records draws in order from its seed).
PROMPT_COUNTS = {"train": 2000, "heldout": 512, "calibration": 1024}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model directory to write")
    p.add_argument("--prompts-out", type=Path, default=None, help="prompt JSONL folder (default: OUT/../prompts)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=704)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 is several times faster than 2 when the 2 cores are shared")
    p.add_argument("--no-autocast", action="store_true", help="train in fp32 (about 2-3x slower on CPU)")
    return p.parse_args(argv)


def build_tokenizer(out: Path, vocab_size: int):
    """Byte-level BPE on the train split; eos is <|endoftext|> (a base model)."""
    root = corpus.stdlib_root()
    tok = train_tokenizer(out, vocab_size, [root / f for f in corpus.split_files("train")])
    tok.eos_token = "<|endoftext|>"
    tok.save_pretrained(out)
    return tok


def target_config(tok, args):
    from transformers import Qwen3Config

    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    return Qwen3Config(
        vocab_size=len(tok), hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=2048, tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-6,
        eos_token_id=eos, pad_token_id=eos, bos_token_id=None,
    )


def token_stream(tok, split: str, seed: int) -> torch.Tensor:
    """One split's files, in a seeded order, tokenized and joined by <|endoftext|>."""
    docs = corpus.read_split(split)
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    ids = tok([docs[i][1] for i in order])["input_ids"]
    return torch.tensor([t for doc in ids for t in doc + [tok.eos_token_id]], dtype=torch.long)


def sample_batch(stream: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=gen)
    return torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()])


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def lm_loss(model, batch: torch.Tensor, autocast: bool) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


def train(model, stream: torch.Tensor, args) -> list[float]:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    losses, ema = [], None
    model.train()
    for step in (bar := tqdm(range(args.steps), desc="train", dynamic_ncols=True)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        loss = lm_loss(model, sample_batch(stream, args.batch_size, args.seq_len, gen), not args.no_autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        ema = losses[-1] if ema is None else 0.95 * ema + 0.05 * losses[-1]
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
    return losses


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, seq_len: int, max_windows: int = 512, batch_size: int = 16) -> float:
    """Mean next-token loss (nats) over consecutive non-overlapping windows, in fp32."""
    model.eval()
    n = min(max_windows, (len(stream) - 1) // seq_len)
    windows = torch.stack([stream[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)])
    total = 0.0
    for b in tqdm(windows.split(batch_size), desc="eval", dynamic_ncols=True, leave=False):
        total += lm_loss(model, b, autocast=False).item() * len(b)
    return total / n


def write_prompts(out: Path, seed: int) -> dict[str, str]:
    return {s: str(corpus.write_jsonl(corpus.prompt_records(s, n, seed=seed), out / f"{s}.jsonl"))
            for s, n in PROMPT_COUNTS.items()}


def save_model(model, tok, out: Path):
    from transformers import GenerationConfig

    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    eos = [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")]
    GenerationConfig(eos_token_id=eos, pad_token_id=eos[0], bos_token_id=None).save_pretrained(out)
    model.float()  # evaluate the bf16-rounded weights, computed in fp32 like vLLM with dtype="float32"


def main(argv=None):
    args = parse_args(argv)
    from transformers import Qwen3ForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tok = build_tokenizer(args.out, args.vocab_size)
    train_stream = token_stream(tok, "train", args.seed)
    heldout_stream = token_stream(tok, "heldout", args.seed)
    print(f"train tokens {len(train_stream):,}  heldout tokens {len(heldout_stream):,}", flush=True)

    model = Qwen3ForCausalLM._from_config(target_config(tok, args), attn_implementation="sdpa")
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    print(f"parameters {n_params:,} (non-embedding {n_params - n_embed:,})", flush=True)

    losses = train(model, train_stream, args)
    train_time = time.time() - t0
    save_model(model, tok, args.out)
    heldout_loss = evaluate(model, heldout_stream, args.seq_len)
    train_eval_loss = evaluate(model, train_stream, args.seq_len)
    prompts = write_prompts(args.prompts_out or args.out.parent / "prompts", args.seed)

    info = {
        "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "tokens_seen": args.steps * args.batch_size * args.seq_len,
        "train_tokens": len(train_stream), "heldout_tokens": len(heldout_stream),
        "parameters": n_params, "non_embedding_parameters": n_params - n_embed,
        "final_train_loss_last50": sum(losses[-50:]) / len(losses[-50:]),
        "train_loss": train_eval_loss, "heldout_loss": heldout_loss,
        "heldout_perplexity": math.exp(heldout_loss),
        "train_wall_time_s": round(train_time, 1), "total_wall_time_s": round(time.time() - t0, 1),
        "threads": args.threads, "autocast_bf16": not args.no_autocast,
        "python_version": platform.python_version(), "stdlib": str(corpus.stdlib_root()),
        "torch_version": torch.__version__, "command": " ".join(["scripts/train_target.py"] + sys.argv[1:]),
        "hyperparameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "prompts": {s: Path(p).name for s, p in prompts.items()},
        "corpus_files": {s: len(corpus.split_files(s)) for s in corpus.SPLITS},
    }
    (args.out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({k: info[k] for k in ("steps", "tokens_seen", "train_loss", "heldout_loss",
                                           "train_wall_time_s")}, indent=2))


if __name__ == "__main__":
    main()
