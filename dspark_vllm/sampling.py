"""The per-request sampling distribution, as vLLM's sampler defines it.

Both sides of speculative sampling need the same thing: the draft samples from
q = process(draft logits) and verification compares with p = process(target
logits), where `process` is vLLM's order of operations: divide by the
temperature, then top-k, then top-p (masked tokens get -inf; vLLM drops min-p under
speculative decoding, see vllm_integration.sampling_rows).
Greedy rows (temperature 0) are left as raw logits: only their argmax matters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: temperature below this is greedy


@dataclass
class SamplingRows:
    """Per-row sampling settings; None means the option is off for every row."""

    temperature: torch.Tensor  # [N] float; < GREEDY_EPS = greedy
    top_k: torch.Tensor | None = None  # [N] int; <= 0 or >= vocab = off
    top_p: torch.Tensor | None = None  # [N] float; 1.0 = off

    @property
    def is_greedy(self) -> torch.Tensor:
        return self.temperature < GREEDY_EPS

    def expand(self, repeats: torch.Tensor) -> "SamplingRows":
        """Repeat request row r `repeats[r]` times (requests -> token rows)."""
        rep = lambda t: None if t is None else t.repeat_interleave(repeats.to(t.device), dim=0)  # noqa: E731
        return SamplingRows(rep(self.temperature), rep(self.top_k), rep(self.top_p))

    def index(self, rows: torch.Tensor) -> "SamplingRows":
        pick = lambda t: None if t is None else t[rows.to(t.device)]  # noqa: E731
        return SamplingRows(pick(self.temperature), pick(self.top_k), pick(self.top_p))


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    V = logits.shape[-1]
    k = torch.where((top_k <= 0) | (top_k >= V), V, top_k).long()
    kth = logits.sort(-1, descending=True).values.gather(-1, (k - 1)[:, None])
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of top tokens whose mass reaches p (always >= 1 token)."""
    sorted_logits, order = logits.sort(-1, descending=False)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum <= (1 - top_p[:, None])
    drop[:, -1] = False
    mask = torch.zeros_like(drop).scatter(-1, order, drop)
    return logits.masked_fill(mask, float("-inf"))


def process_logits(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """Float32 logits whose softmax is the sampling distribution of each row."""
    logits = logits.float()
    temp = torch.where(rows.is_greedy, torch.ones_like(rows.temperature), rows.temperature)
    logits = logits / temp[:, None].to(logits.device)
    if rows.top_k is not None:
        logits = apply_top_k(logits, rows.top_k.to(logits.device))
    if rows.top_p is not None:
        logits = apply_top_p(logits, rows.top_p.to(logits.device).float())
    return logits


def exponential_noise(rows: int, vocab: int, device, generators: dict[int, torch.Generator] | None = None):
    """Exp(1) noise [rows, vocab]; row i comes from generators[i] when given.

    Clamped away from 0 so that a zero weight divided by it is 0, never NaN.
    """
    noise = torch.empty(rows, vocab, device=device).exponential_()
    for i, g in (generators or {}).items():
        noise[i] = torch.empty(vocab, device=device).exponential_(generator=g)
    return noise.clamp(min=torch.finfo(noise.dtype).tiny)


def race_sample(weights: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample an index per row with probability w_i / sum_j w_j: argmax_i w_i / E_i.

    E_i ~ Exp(1) iid, so E_i / w_i ~ Exp(rate w_i); the smallest of independent
    exponentials is index i with probability w_i / sum_j w_j (the exponential race),
    so the weights need no normalisation and a zero weight is never picked.
    """
    return (weights / noise).argmax(-1)


def sample(probs: torch.Tensor, generators: dict[int, torch.Generator] | None = None) -> torch.Tensor:
    """One token per row from probs [N, V]; row i uses generators[i] if given."""
    return race_sample(probs, exponential_noise(probs.shape[0], probs.shape[1], probs.device, generators))
