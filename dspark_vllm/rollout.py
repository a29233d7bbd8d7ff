"""Rollouts of a drafter against its target: what verification would keep.

Used to calibrate the confidence head (scripts/calibrate.py) and to measure
its calibration: the target writes a continuation (Hugging Face transformers,
no vLLM), every answer token is an anchor, the drafter drafts a block from the
target's features before it exactly as in serving (`proposer.draft_rounds`),
and each round's prefix survival S_k is measured:
- greedy: slot k survives iff drafts 1..k equal the target's continuation;
- temperature T > 0: S_k = prod_{j<=k} min(1, p_j(d_j) / q_j(d_j)), the exact
  probability that speculative sampling keeps drafts 1..k.
"""

from __future__ import annotations

import torch

from .proposer import draft_rounds
from .sampling import GREEDY_EPS
from .training.target import target_features, target_logits


@torch.inference_mode()
def generate(target, prompt: list[int], max_tokens: int, temperature: float, eos: set[int]) -> list[int]:
    """The target's continuation: greedy, or plain sampling at `temperature`."""
    out = target(input_ids=torch.tensor([prompt], device=target.device), use_cache=True)
    tokens: list[int] = []
    for _ in range(max_tokens):
        logits = out.logits[0, -1].float()
        if temperature < GREEDY_EPS:
            token = int(logits.argmax())
        else:
            token = int(torch.multinomial((logits / temperature).softmax(-1), 1))
        tokens.append(token)
        if token in eos:
            break
        out = target(input_ids=torch.tensor([[token]], device=target.device),
                     past_key_values=out.past_key_values, use_cache=True)
    return tokens


def greedy_survival(drafts: torch.Tensor, text: torch.Tensor, anchors: torch.Tensor):
    """S_k = 1[drafts 1..k match the text]; observed where the text covers slot k
    or an earlier slot already failed."""
    K = drafts.shape[1]
    pos = anchors[:, None] + 1 + torch.arange(K, device=text.device)  # position slot k predicts
    inside = pos < text.shape[0]
    match = (drafts == text[pos.clamp(max=text.shape[0] - 1)]) & inside
    survival = match.long().cumprod(1)
    failed_before = torch.cat([torch.zeros_like(inside[:, :1]), (survival == 0)[:, :-1]], 1)
    return survival.float(), inside | failed_before


@torch.inference_mode()
def sampled_survival(target, drafts, q, text, anchors, temperature: float):
    """S_k = prod_{j<=k} min(1, p_j(d_j) / q_j(d_j)), p from the target on the drafted prefix.

    p_1 is the target's distribution after text[:a+1]; p_2..p_K come from one
    batched forward of the K - 1 drafted tokens on top of a key/value cache of
    the text, shared by the rows: row b's drafts see text[:a_b+1] (the 2-D
    attention mask hides the cached text after its anchor) at positions
    a_b + 1, .... The same numbers as a forward of text[:a+1] + drafts per row,
    at a small part of its cost (the context runs once, not once per row).
    """
    B, K = drafts.shape
    ctx = int(anchors.max()) + 1
    out = target.model(input_ids=text[None, :ctx], use_cache=True)
    hidden = [out.last_hidden_state[0, anchors][:, None]]  # [B, 1, d]: predicts slot 1
    if K > 1:
        cache = out.past_key_values
        cache.batch_repeat_interleave(B)
        steps = torch.arange(K - 1, device=text.device)
        mask = torch.cat([torch.arange(ctx, device=text.device)[None] <= anchors[:, None],
                          torch.ones(B, K - 1, dtype=torch.bool, device=text.device)], 1)
        hidden.append(target.model(input_ids=drafts[:, :-1], past_key_values=cache, attention_mask=mask.long(),
                                   position_ids=anchors[:, None] + 1 + steps).last_hidden_state)
    p = (target_logits(target, torch.cat(hidden, 1)) / temperature).softmax(-1)  # [B, K, V]
    p_d = p.gather(-1, drafts[..., None]).squeeze(-1)
    q_d = q.float().gather(-1, drafts[..., None]).squeeze(-1)
    accept = torch.where(q_d > 0, (p_d / q_d.clamp(min=1e-30)).clamp(max=1.0), torch.zeros_like(p_d))
    return accept.cumprod(1), torch.ones_like(accept, dtype=torch.bool)


def rollout(target, model, prompt: list[int], max_tokens: int, temperature: float, eos: set[int],
            batch: int = 32):
    """(confidence logits, survival, observed) as numpy arrays [rounds, K] for one prompt,
    or None when the continuation has no drafting round."""
    dev = target.device
    answer = generate(target, prompt, max_tokens, temperature, eos)
    text = torch.tensor(prompt + answer, device=dev)
    feats, _ = target_features(target, text[None], list(model.config.target_layer_ids))
    feats = feats[0].to(next(model.parameters()).dtype)
    # Anchors: every answer token that is not a final end-of-sequence token.
    last = text.shape[0] - (1 if answer and answer[-1] in eos else 0)
    all_anchors = torch.arange(len(prompt), last, device=dev)
    if all_anchors.numel() == 0:  # the target ended at once: nothing to draft for
        return None
    out = ([], [], [])
    for chunk in all_anchors.split(batch):
        d = draft_rounds(model, feats, text, chunk, temperature)
        if temperature < GREEDY_EPS:
            surv, obs = greedy_survival(d.tokens, text, chunk)
        else:
            surv, obs = sampled_survival(target, d.tokens, d.probs, text, chunk, temperature)
        keep = obs[:, 0]  # rounds with at least one observed slot
        for acc, x in zip(out, (d.confidence_logits, surv, obs)):
            acc.append(x[keep].float().cpu())
    if not out[0]:
        return None
    return tuple(torch.cat(x).numpy() for x in out)
