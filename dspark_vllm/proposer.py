"""DSpark drafting: one parallel backbone forward per round, then the Markov loop.

`draft_block` is the whole algorithm of one drafting round for a batch of
requests, independent of vLLM: where the context K/V live is hidden behind the
`attend` callable (dense tensors in tests and training, vLLM's paged KV cache
in serving; see vllm_integration.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model.dspark import AttendFn, DSparkDraftModel, dense_block_attention
from .sampling import SamplingRows, greedy_tokens, process_logits, sample


@dataclass
class Drafts:
    """One round's proposals for B requests (K = tokens drafted per request)."""

    tokens: torch.Tensor  # [B, K] int64
    probs: torch.Tensor | None  # [B, K, V] q of each slot; zero rows for greedy requests
    confidences: torch.Tensor | None  # [B, K] c_k = P(slot k survives | slots < k survived)
    confidence_logits: torch.Tensor | None = None  # [B, K] the head's logits z_k, c_k = sigmoid(z_k)


@torch.inference_mode()
def draft_block(
    model: DSparkDraftModel,
    anchors: torch.Tensor,  # [B] last committed token of each request
    anchor_positions: torch.Tensor,  # [B] its position
    attend: AttendFn,
    num_tokens: int,
    sampling: SamplingRows,
    generators: dict[int, torch.Generator] | None = None,
    sampled: bool | None = None,
) -> Drafts:
    """sampled: whether any row samples (None: read it from `sampling`, a host sync on
    CUDA; serving passes vLLM's batch-level flag instead)."""
    B, gamma = anchors.shape[0], model.config.block_size
    # 1. Parallel backbone: [anchor, mask, ...] at positions anchor_pos + 0..gamma-1.
    ids = model.block_input_ids(anchors)
    positions = anchor_positions[:, None] + torch.arange(gamma, device=anchors.device)
    hidden = model.backbone(ids.flatten(), positions.flatten(), attend).view(B, gamma, -1)
    base = model.base_logits(hidden[:, :num_tokens])  # U_k, [B, K, V]

    # 2. Sequential Markov loop: slot k's logits get the bias of the token drafted at k-1.
    if sampled is None:
        sampled = not bool(sampling.is_greedy.all())
    greedy = sampling.is_greedy.to(anchors.device) if sampled else None
    probs = base.new_zeros(base.shape) if sampled else None
    head = model.markov_head
    state = head.init_state(B, hidden) if head is not None else None
    add_markov_bias = head.adder(base.dtype) if head is not None else None
    prev, drafted = anchors, []
    base_k, hidden_k = base.unbind(1), hidden.unbind(1)
    for k in range(num_tokens):
        logits = sampling.add_bias(base_k[k])
        if head is not None:
            logits, state = add_markov_bias(logits, prev, hidden_k[k], state)  # float32
        token = greedy_tokens(logits)
        if sampled:
            q = process_logits(logits, sampling).softmax(-1)
            token = torch.where(greedy, token, sample(q, generators))
            probs[:, k] = q * (~greedy)[:, None]
        drafted.append(token)
        prev = token
    tokens = torch.stack(drafted, dim=1)

    # 3. Confidence of slot k from [h_k ; W1[x_{k-1}]] (x_{-1} = anchor).
    prev_tokens = torch.cat([anchors[:, None], tokens[:, :-1]], dim=1)
    conf_logits = model.inference_confidence_logits(hidden[:, :num_tokens], prev_tokens)
    confidences = None if conf_logits is None else torch.sigmoid(conf_logits)
    return Drafts(tokens, probs, confidences, conf_logits)


@torch.inference_mode()
def draft_rounds(model: DSparkDraftModel, features: torch.Tensor, text: torch.Tensor, anchors: torch.Tensor,
                 temperature: float = 0.0, num_tokens: int | None = None) -> Drafts:
    """Dense reference: one drafting round per anchor position of one sequence.

    The context of an anchor at position p is the target features of positions
    < p, attended densely (`dense_block_attention`); serving gets the same
    rounds from vLLM's paged cache.

    features [L, F], text [L], anchors [B] positions. Returns Drafts of
    num_tokens slots (default: the whole block).
    """
    K = model.config.block_size
    ctx = int(anchors.max())
    fused = model.fuse_target_features(features[:ctx])
    kv = model.context_keys_values(fused, torch.arange(ctx, device=text.device))
    B = anchors.shape[0]
    ctx_k = [k.expand(B, *k.shape) for k, _ in kv]
    ctx_v = [v.expand(B, *v.shape) for _, v in kv]
    attend = dense_block_attention(ctx_k, ctx_v, anchors, K)
    sampling = SamplingRows(torch.full((B,), float(temperature), device=text.device))
    return draft_block(model, text[anchors], anchors, attend, num_tokens or K, sampling)


class PendingContext:
    """Steps' draft context whose K/V are not written yet, for one write later.

    Writing a step's context (fc, norm, K/V projections, rotary, cache update) is
    a dozen small ops whose cost hardly depends on the number of tokens. A step
    in which no request drafts (the break-even guard skipped it, or every request
    is mid-prefill) only stashes its target features here; the next drafting
    round writes every stashed step with its own in one go (`take`), or a full
    stash is written at once. The cache ends up as with a write per step: writes
    keep their order, and of two writes to one slot (freed and handed to another
    request in between) the later wins (`superseded_to_skip`).

    Tensors are kept by reference: pass copies of buffers the runner reuses.
    """

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.num_tokens = 0

    def add(self, features: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> bool:
        """Stash one step's tokens; True when the stash is full (write it now)."""
        self.parts.append((features, positions, slots))
        self.num_tokens += features.shape[0]
        return self.num_tokens >= self.max_tokens

    def take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features, positions, slots) of all stashed steps, in order; empties the stash."""
        if len(self.parts) == 1:
            out = self.parts[0]
        else:
            features, positions, slots = (torch.cat(x) for x in zip(*self.parts))
            out = features, positions, superseded_to_skip(slots)
        self.parts, self.num_tokens = [], 0
        return out


def superseded_to_skip(slots: torch.Tensor) -> torch.Tensor:
    """slots with every write that a later one to the same slot overrides set to -1
    (vLLM's cache-update kernels skip negative slots). No host sync: a stable sort
    puts each slot's writes together in time order, and the last of a run stays."""
    ordered, order = torch.sort(slots, stable=True)
    last = torch.ones_like(slots, dtype=torch.bool)
    last[:-1] = ordered[1:] != ordered[:-1]
    keep = torch.empty_like(last).scatter_(0, order, last)
    return torch.where(keep, slots, -1)
