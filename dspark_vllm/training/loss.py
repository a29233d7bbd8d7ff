"""The DSpark training objective (paper eq. 9-12).

Per block slot k (1-based) with weight w_k = exp(-(k-1)/gamma) times the
supervision mask:
- CE against the target-written token x*_k,
- L1 = ||p_draft - p_target||_1 (full L1 = 2 TV, fp32, T=1),
- BCE of the confidence logit against the soft survival label
  c*_k = clamp(1 - L1/2, 0, 1) (detached): the analytic acceptance probability.
L = ce*CE + l1*L1 + confidence*BCE, normalised by the sum of weights.
DFlash ablation (no Markov / confidence head): ce=1, l1=0, confidence=0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .blocks import BlockPredictions


@dataclass(frozen=True)
class LossWeights:
    ce: float = 0.1
    l1: float = 0.9
    confidence: float = 1.0
    gamma: float = 4.0  # position decay


def position_weights(block_size: int, gamma: float, device=None) -> torch.Tensor:
    """w_k = exp(-(k-1)/gamma), k = 1..block_size."""
    return torch.exp(-torch.arange(block_size, device=device, dtype=torch.float32) / gamma)


def weight_sum(mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """The loss normaliser of blocks with supervision mask [N, K]."""
    return (mask * position_weights(mask.shape[1], gamma, mask.device)).sum()


@dataclass
class LossParts:
    numerator: torch.Tensor  # weighted sum of the total loss (divide by the weight sum)
    accept: torch.Tensor  # [N, K] per-slot acceptance probability 1 - L1/2 (detached)
    mask: torch.Tensor  # [N, K]


def dspark_loss(pred: BlockPredictions, w: LossWeights) -> LossParts:
    mask = pred.labels.mask
    weights = mask * position_weights(mask.shape[1], w.gamma, mask.device)
    logits = pred.logits.float()
    total = torch.zeros_like(mask)
    if w.ce:
        ce = F.cross_entropy(logits.flatten(0, 1), pred.labels.labels.flatten(), reduction="none")
        total = total + w.ce * ce.view_as(mask)
    l1 = (logits.softmax(-1) - pred.target_logits.float().softmax(-1)).abs().sum(-1)
    accept = (1 - 0.5 * l1).clamp(0, 1)
    if w.l1:
        total = total + w.l1 * l1
    if w.confidence and pred.confidence_logits is not None:
        bce = F.binary_cross_entropy_with_logits(pred.confidence_logits.float(), accept.detach(),
                                                 reduction="none")
        total = total + w.confidence * bce
    return LossParts((weights * total).sum(), accept.detach(), mask)


class AcceptanceStats:
    """Running per-position accept rate (1 - L1/2) and tau_probabilistic.

    tau = 1 + sum_k prod_{j<=k} accept_j per block (expected accepted length
    incl. the bonus token under prefix verification at T=1), averaged over blocks.
    """

    def __init__(self, block_size: int):
        self.accept_sum = torch.zeros(block_size, dtype=torch.float64)
        self.count = torch.zeros(block_size, dtype=torch.float64)
        self.tau_sum, self.blocks = 0.0, 0

    def add(self, accept: torch.Tensor, mask: torch.Tensor) -> None:
        acc, mask = accept.detach().double().cpu(), mask.detach().double().cpu()
        self.accept_sum += (acc * mask).sum(0)
        self.count += mask.sum(0)
        self.tau_sum += float((1 + (acc * mask).cumprod(1).sum(1)).sum())
        self.blocks += acc.shape[0]

    def summary(self) -> dict:
        rates = (self.accept_sum / self.count.clamp(min=1)).tolist()
        out = {f"accept@{k + 1}": r for k, r in enumerate(rates) if self.count[k] > 0}
        out["tau_probabilistic"] = self.tau_sum / max(self.blocks, 1)
        return out


def warmup_cosine(warmup: int, total: int):
    """LR multiplier: linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f
