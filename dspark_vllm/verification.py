"""Exact (lossless) verification of chain drafts for speculative decoding.

Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): a draft proposes
x_1..x_k, the target scores all positions in one pass, and position j accepts x_j
with probability min(1, p_j(x_j) / q_j(x_j)). At the first rejection we emit a
sample from the residual norm(max(p_j - q_j, 0)) and stop; if every draft is
accepted we emit a "bonus" sample from p_{k+1}. Every emitted token is then
distributed exactly as the target would have sampled it.

Batch layout: request r owns num_draft[r] consecutive entries of draft_token_ids
(and of draft_probs) and num_draft[r] + 1 consecutive rows of target_logits: one
per draft position, then its bonus row.
"""
from __future__ import annotations

import torch

from .sampling import exponential_noise, greedy_tokens, race_sample  # noqa: F401  (race_sample is part of this API)

PLACEHOLDER = -1
RESIDUAL_EPS = 1e-12


def accept_probs(p_x: torch.Tensor, q_x: torch.Tensor) -> torch.Tensor:
    """Acceptance probability min(1, p(x) / q(x)) of a draft token x.

    p_x = p(x) is the target probability of x, q_x = q(x) the probability the
    draft gave it. A deterministic draft has q = one-hot(x), i.e. q_x = 1, so it is
    accepted with probability p(x). q_x = 0 (a placeholder or an impossible draft)
    gives 0: such a draft is always rejected, and no division by 0 happens.
    """
    ok = q_x > 0
    ratio = p_x / torch.where(ok, q_x, torch.ones_like(q_x))
    return torch.where(ok, ratio.clamp(max=1.0), torch.zeros_like(p_x))


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Distribution to sample after a rejection: norm(max(p - q, 0)), row-wise.

    Why the output is exactly p: y is emitted by acceptance with probability
    q(y) min(1, p(y)/q(y)) = min(p(y), q(y)); a rejection happens with probability
    Z = 1 - sum_x min(p(x), q(x)) = sum_x max(p(x) - q(x), 0), after which y is
    drawn with probability max(p(y) - q(y), 0) / Z. The two add up to
    min(p, q) + max(p - q, 0) = p. When Z <= 1e-12 (p == q) a rejection is
    (numerically) impossible, and we fall back to p to stay a distribution.
    """
    w = (p - q).clamp(min=0)
    z = w.sum(-1, keepdim=True)
    return torch.where(z > RESIDUAL_EPS, w / z.clamp(min=RESIDUAL_EPS), p)


def num_accepted(output: torch.Tensor) -> torch.Tensor:
    """Accepted draft tokens per row of verify()'s output: non-placeholders - 1."""
    return (output != PLACEHOLDER).sum(-1) - 1


def _check(target_logits, draft_token_ids, num_draft, is_greedy, draft_probs, generators):
    n, total = len(num_draft), sum(num_draft)
    if any(k < 0 for k in num_draft):
        raise ValueError(f"num_draft must be >= 0, got {num_draft}")
    if tuple(is_greedy.shape) != (n,):
        raise ValueError(f"is_greedy has shape {tuple(is_greedy.shape)}, expected ({n},) = len(num_draft)")
    if tuple(draft_token_ids.shape) != (total,):
        raise ValueError(f"draft_token_ids has shape {tuple(draft_token_ids.shape)}, expected ({total},) = sum(num_draft)")
    if target_logits.dim() != 2 or target_logits.shape[0] != total + n:
        raise ValueError(f"target_logits has shape {tuple(target_logits.shape)}, expected ({total + n}, V) = sum(num_draft) + num_reqs rows")
    if draft_probs is not None and tuple(draft_probs.shape) != (total, target_logits.shape[1]):
        raise ValueError(f"draft_probs has shape {tuple(draft_probs.shape)}, expected ({total}, {target_logits.shape[1]})")
    if any(not 0 <= r < n for r in (generators or {})):
        raise ValueError(f"generators keys must be request indices in [0, {n})")


def _draws(num_draft, vocab, device, generators):
    """Uniforms for the accept tests [sum(num_draft)] and Exp(1) noise [num_reqs, V].

    A seeded request draws its num_draft[r] uniforms, then its V exponentials,
    from its own generator, so its output does not depend on the rest of the batch.
    """
    u = torch.rand(sum(num_draft), device=device)
    for r, g in (generators or {}).items():
        start = sum(num_draft[:r])
        u[start:start + num_draft[r]] = torch.rand(num_draft[r], generator=g, device=device)
    return u, exponential_noise(len(num_draft), vocab, device, generators)


def _draft_q_at(draft_probs, x):
    """q(x) for every draft entry: 1 for a deterministic draft (draft_probs None
    or an all-zero row), draft_probs[i, x_i] otherwise, 0 for a placeholder."""
    q_x = torch.ones(x.shape, device=x.device)
    if draft_probs is not None:
        q = draft_probs.gather(1, x.clamp(min=0).unsqueeze(1)).squeeze(1).float()
        q_x = torch.where(draft_probs.amax(-1) > 0, q, q_x)
    return torch.where(x >= 0, q_x, 0.0)


def _draft_q(draft_probs, idx, x, vocab):
    """Full draft distributions q for draft entries idx with ids x.

    One-hot(x) for a deterministic draft (draft_probs None or an all-zero row),
    draft_probs[idx] otherwise, and all zeros for a placeholder (x < 0).
    """
    one_hot = torch.nn.functional.one_hot(x.clamp(min=0), vocab).float()
    if draft_probs is not None:
        rows = draft_probs[idx].float()
        one_hot = torch.where((rows.amax(-1, keepdim=True) > 0), rows, one_hot)
    return one_hot * (x >= 0).unsqueeze(-1)


def verify(
    target_logits: torch.Tensor,
    draft_token_ids: torch.Tensor,
    num_draft: list[int],
    is_greedy: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    generators: dict[int, torch.Generator] | None = None,
) -> torch.Tensor:
    """Verify chain drafts for a batch; see the module docstring for the layout.

    softmax(target_logits[row]) must already be the target distribution p of the
    row (temperature, top-k/p, penalties applied). Greedy requests accept while the
    draft equals argmax and emit the argmax of the first mismatching (or bonus) row.
    Returns [num_reqs, max(num_draft) + 1] int64: accepted drafts, then the one
    emitted token (correction or bonus), padded with PLACEHOLDER.
    """
    _check(target_logits, draft_token_ids, num_draft, is_greedy, draft_probs, generators)
    device, vocab = target_logits.device, target_logits.shape[1]
    n, total, k = len(num_draft), sum(num_draft), max(num_draft, default=0)
    nd = torch.tensor(num_draft, dtype=torch.long, device=device)
    greedy = is_greedy.to(device=device, dtype=torch.bool)
    x = draft_token_ids.to(device=device, dtype=torch.long)

    req = torch.repeat_interleave(torch.arange(n, device=device), nd)  # request of each draft
    first = torch.cumsum(nd, 0) - nd  # index of each request's first draft
    pos = torch.arange(total, device=device) - first[req]  # position within the chain
    rows = torch.arange(total, device=device) + req  # target row scoring each draft

    # Accept tests for every draft position at once.
    argmax = greedy_tokens(target_logits)
    lse = torch.logsumexp(target_logits.float(), -1)
    p_x = (target_logits[rows, x.clamp(min=0)].float() - lse[rows]).exp()
    q_x = _draft_q_at(draft_probs, x)
    u, noise = _draws(num_draft, vocab, device, generators)
    ok = torch.where(greedy[req], x == argmax[rows], u < accept_probs(p_x, q_x))

    # Accepted prefix length per request: count of leading accepts.
    accept = torch.zeros(n, k, dtype=torch.long, device=device)
    drafts = torch.full((n, k), PLACEHOLDER, dtype=torch.long, device=device)
    accept[req, pos], drafts[req, pos] = ok.long(), x
    n_acc = accept.cumprod(1).sum(1)

    # One emitted token per request: from the residual at the first rejection, else p of the bonus row.
    emit_rows = first + torch.arange(n, device=device) + n_acc
    p = target_logits[emit_rows].float().softmax(-1)
    rejected = n_acc < nd
    q = torch.zeros_like(p)
    if total:
        idx = (first + n_acc).clamp(max=total - 1)  # the rejected draft, if any
        q = _draft_q(draft_probs, idx, torch.where(rejected, x[idx], PLACEHOLDER), vocab)
    emitted = torch.where(greedy, argmax[emit_rows], race_sample(residual(p, q), noise))

    out = torch.full((n, k + 1), PLACEHOLDER, dtype=torch.long, device=device)
    keep = torch.arange(k, device=device) < n_acc.unsqueeze(1)
    out[:, :k] = torch.where(keep, drafts, PLACEHOLDER)
    return out.scatter_(1, n_acc.unsqueeze(1), emitted.unsqueeze(1))


def verify_greedy(target_logits: torch.Tensor, draft_token_ids: torch.Tensor, num_draft: torch.Tensor,
                  max_len: int) -> torch.Tensor:
    """verify() for a batch in which every request is greedy, in a few tensor ops and
    without a host sync: a draft is accepted while it equals the target's argmax,
    then the argmax of the first mismatching row (or of the bonus row) is emitted.

    Same layout and output as verify(); num_draft is a tensor here and max_len its
    maximum. One max over the vocabulary is the only pass over the logits (no
    float32 copies, no softmax), which is what makes greedy verification cheap.
    """
    device = target_logits.device
    nd = num_draft.to(device=device, dtype=torch.long)
    n, total = nd.shape[0], draft_token_ids.shape[0]
    argmax = greedy_tokens(target_logits)
    if total == 0:  # no request drafted: each has only its bonus row
        return argmax.view(n, 1)
    first = torch.cumsum(nd, 0) - nd  # index of each request's first draft
    j = torch.arange(max_len, device=device)
    idx = (first[:, None] + j).clamp(max=total - 1)  # [n, max_len] draft index (clamped past the end)
    rows = idx + torch.arange(n, device=device)[:, None]  # the target row scoring it
    x = draft_token_ids.to(device=device, dtype=torch.long)[idx]
    match = (x == argmax[rows]) & (j < nd[:, None])
    n_acc = match.long().cumprod(1).sum(1, keepdim=True)
    # Slot j <= n_acc holds the target's argmax of its row: an accepted draft equals it, and
    # slot n_acc is the emitted token (the first mismatch's row, or the bonus row).
    slot = torch.arange(max_len + 1, device=device)
    out_rows = (first + torch.arange(n, device=device))[:, None] + slot
    return torch.where(slot <= n_acc, argmax[out_rows.clamp(max=argmax.shape[0] - 1)], PLACEHOLDER)


def verify_greedy_uniform(target_logits: torch.Tensor, draft_token_ids: torch.Tensor, num_draft: int) -> torch.Tensor:
    """verify_greedy() for a batch in which every request verifies the same number L of
    drafts (a single request, the `fixed` policy): the rows are then n blocks of L + 1,
    and a reshape replaces verify_greedy's index arithmetic (the same output in half the ops)."""
    L = num_draft
    argmax = greedy_tokens(target_logits).view(-1, L + 1)  # [n, L + 1]: L draft rows, then the bonus row
    if L == 0:
        return argmax
    x = draft_token_ids.view(-1, L)
    n_acc = (x == argmax[:, :L]).cumprod(1).sum(1, keepdim=True)  # accepted prefix length [n, 1]
    # Accepted drafts equal their rows' argmax, and slot n_acc is the emitted argmax.
    return torch.where(torch.arange(L + 1, device=argmax.device) <= n_acc, argmax, PLACEHOLDER)
