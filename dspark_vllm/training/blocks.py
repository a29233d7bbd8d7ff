"""The training forward: many draft blocks of one sequence in one dense attention.

For a sequence (prompt + target answer) we pick *anchors*: positions a with
loss_mask[a] and loss_mask[a+1]. Each anchor opens a *block* [x_a, mask, ...,
mask] at positions a, a+1, ..., a+block_size-1 whose slot k predicts x_{a+k+1}.
A block sees the fused target features of the context strictly before its
anchor and itself (bidirectionally), never another block. This is exactly
what one drafting round does at inference (`proposer.draft_block`), for all
anchors at once; the *Markov head* is teacher-forced with the ground-truth
previous tokens and applied slot by slot as in `draft_block`.

Several sequences can share one forward (`pack`): they are concatenated, and
`segments` (each token's sequence) keeps every block to its own sequence's
context and labels, with positions restarting at 0 per sequence. The result
is the per-sequence forward's, block for block. On a GPU, where a small
forward is launch-bound, packing pays until the dense [blocks, context + blocks]
mask's quadratic cost takes over: on an H200, default-pair shapes (16 sequences
of 530 tokens, 126 anchors each), a step took 138 ms one sequence at a time,
43 ms packed by 4 and 69 ms packed by 16. On a CPU it does not pay (pack=1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.dspark import AttendFn, DSparkDraftModel, grouped_query_attention


def anchor_candidates(loss_mask: torch.Tensor) -> torch.Tensor:
    """Positions a with loss_mask[a] and loss_mask[a+1]: anchor and first label are answer tokens."""
    return torch.nonzero(loss_mask[:-1] & loss_mask[1:]).flatten()


def sample_anchors(loss_mask: torch.Tensor, num_anchors: int, generator: torch.Generator) -> torch.Tensor:
    """Up to num_anchors candidates, uniformly without replacement, in ascending order."""
    cand = anchor_candidates(loss_mask.cpu())
    pick = torch.randperm(len(cand), generator=generator)[:num_anchors]
    return cand[pick].sort().values


@dataclass
class BlockLabels:
    """Supervision of N blocks of size K."""

    labels: torch.Tensor  # [N, K] token at anchor+k+1 (clamped at the sequence end)
    label_positions: torch.Tensor  # [N, K] anchor+k+1, clamped
    mask: torch.Tensor  # [N, K] float: label inside the answer, cumprod'ed along the block


def block_labels(input_ids: torch.Tensor, loss_mask: torch.Tensor, anchors: torch.Tensor,
                 block_size: int, segments: torch.Tensor | None = None) -> BlockLabels:
    S = input_ids.shape[0]
    pos = anchors[:, None] + torch.arange(1, block_size + 1, device=anchors.device)
    inside = pos < S
    pos = pos.clamp(max=S - 1)
    valid = inside & loss_mask[pos]
    if segments is not None:  # packed: a label past its sequence's end is no label
        valid &= segments[pos] == segments[anchors][:, None]
    mask = valid.float().cumprod(dim=1)  # supervision stops at the end of the answer
    return BlockLabels(input_ids[pos], pos, mask)


def block_attention_mask(seq_len: int, anchors: torch.Tensor, block_size: int,
                         segments: torch.Tensor | None = None) -> torch.Tensor:
    """[N*K, S + N*K] bool: context strictly before the anchor (and, packed, in its
    own sequence), plus the query's own block."""
    N = anchors.shape[0]
    block_of_query = torch.arange(N * block_size, device=anchors.device) // block_size
    anchor_of_query = anchors[block_of_query]
    context = torch.arange(seq_len, device=anchors.device)[None, :] < anchor_of_query[:, None]
    if segments is not None:
        context &= segments[None, :] == segments[anchor_of_query][:, None]
    same_block = block_of_query[:, None] == block_of_query[None, :]
    return torch.cat([context, same_block], dim=1)


def dense_training_attention(ctx_kv, mask: torch.Tensor) -> AttendFn:
    """attend() over [context K/V ; block K/V] with an explicit mask (plain SDPA, fp32)."""

    def attend(i, q, k, v):
        ctx_k, ctx_v = ctx_kv[i]
        H, hd = q.shape[1], q.shape[2]
        keys = torch.cat([ctx_k, k], dim=0).transpose(0, 1)  # [Hkv, S+T, hd]
        vals = torch.cat([ctx_v, v], dim=0).transpose(0, 1)
        out = grouped_query_attention(q.transpose(0, 1)[None], keys[None], vals[None], mask[None, None])
        return out[0].transpose(0, 1).reshape(q.shape[0], H * hd).to(q.dtype)  # from [1, H, T, hd]

    return attend


@dataclass
class BlockPredictions:
    """What the drafter says about N blocks, and the targets to compare with."""

    logits: torch.Tensor  # [N, K, V] fp32 Markov-corrected draft logits
    confidence_logits: torch.Tensor | None  # [N, K] survival logits z_k
    target_logits: torch.Tensor  # [N, K, V] fp32 lm_head(target last_hidden[anchor+k])
    labels: BlockLabels


def markov_logits(model: DSparkDraftModel, base: torch.Tensor, hidden: torch.Tensor,
                  prev_tokens: torch.Tensor) -> torch.Tensor:
    """Slot k: U_k + Markov bias of x_{k-1}, applied step by step like draft_block."""
    head = model.markov_head
    if head is None:
        return base
    state = head.init_state(base.shape[0], hidden)
    if state is None:  # no state between slots (vanilla head): all slots in one GEMM
        bias, _ = head.step(prev_tokens.flatten(), hidden.flatten(0, 1), None)
        return base + bias.view_as(base)
    biases = []
    for k in range(base.shape[1]):
        bias, state = head.step(prev_tokens[:, k], hidden[:, k], state)
        biases.append(bias)
    # one add over the block, not one per slot: backward through base[:, k] would
    # materialise a zero [N, K, V] gradient per slot (about 8% of a training step)
    return base + torch.stack(biases, dim=1)


def block_forward(model: DSparkDraftModel, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                  features: torch.Tensor, last_hidden: torch.Tensor, anchors: torch.Tensor,
                  prev_tokens: torch.Tensor | None = None,
                  segments: torch.Tensor | None = None) -> BlockPredictions:
    """Draft logits and confidences of the blocks at `anchors` of one sequence
    (or of packed sequences: `segments` [S] is each token's sequence, ascending).

    prev_tokens [N, K] are the Markov head's teacher-forced previous tokens
    (default: [anchor, ground-truth labels[:-1]]).
    """
    S, K, dtype = input_ids.shape[0], model.config.block_size, model.fc.weight.dtype
    lab = block_labels(input_ids, loss_mask, anchors, K, segments)
    positions = torch.arange(S, device=input_ids.device)
    if segments is not None:  # positions restart at each sequence's first token
        positions = positions - torch.searchsorted(segments, segments)
    ctx_kv = model.context_keys_values(model.fuse_target_features(features.to(dtype)), positions)
    attend = dense_training_attention(ctx_kv, block_attention_mask(S, anchors, K, segments))

    N = anchors.shape[0]
    ids = model.block_input_ids(input_ids[anchors])
    block_pos = positions[anchors][:, None] + torch.arange(K, device=anchors.device)
    hidden = model.backbone(ids.flatten(), block_pos.flatten(), attend).view(N, K, -1)
    if prev_tokens is None:
        prev_tokens = torch.cat([input_ids[anchors][:, None], lab.labels[:, :-1]], dim=1)
    logits = markov_logits(model, model.base_logits(hidden), hidden, prev_tokens)
    conf = model.confidence_logits(hidden, prev_tokens)
    with torch.no_grad():  # the frozen lm_head on the target's hidden state = target logits,
        # once per distinct position (neighbouring blocks overlap: ~3x fewer rows)
        rows, where = torch.unique(lab.label_positions - 1, return_inverse=True)
        target = model.lm_head(last_hidden[rows].to(dtype)).float()[where]
    return BlockPredictions(logits, conf, target, lab)


@dataclass
class Packed:
    """Sequences concatenated for one forward; anchors index the concatenation."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    features: torch.Tensor
    last_hidden: torch.Tensor
    anchors: torch.Tensor
    segments: torch.Tensor | None  # [S] the sequence of each token: 0, 0, ..., 1, 1, ...; None for one


def pack(samples: list, anchors: list[torch.Tensor]) -> Packed:
    """Concatenate samples (with input_ids, loss_mask, features, last_hidden) and their anchors."""
    if len(samples) == 1:  # nothing to concatenate: no copy, no segments
        s = samples[0]
        return Packed(s.input_ids, s.loss_mask, s.features, s.last_hidden, anchors[0], None)
    lengths = [len(s.input_ids) for s in samples]
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0).tolist()
    cat = lambda name: torch.cat([getattr(s, name) for s in samples])  # noqa: E731
    return Packed(cat("input_ids"), cat("loss_mask"), cat("features"), cat("last_hidden"),
                  torch.cat([a + start for a, start in zip(anchors, starts)]),
                  torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(lengths)))
