"""The DSpark draft model in plain PyTorch, with DeepSpec's module names.

`state_dict()` keys are exactly the published checkpoint names, so a DeepSpec
checkpoint loads with `load_state_dict` and a trained model saves in the same
format. The model never owns a KV cache: every attention layer hands its
queries, keys and values to an `attend` callable. Training and the reference
path attend over dense tensors (`dense_block_attention`); the vLLM integration
attends over the draft layers' blocks in vLLM's paged KV cache.

Paper terms: the *anchor* is the last committed token; a *block* is
`[anchor, mask x (block_size-1)]`, each slot predicting the next token; the
*Markov head* adds a low-rank bias W2(W1[x_{k-1}]) to slot k's logits; the
*confidence head* predicts slot k's survival from [h_k ; W1[x_{k-1}]].
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import DSparkConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op (normalises in float32 internally); a hand-written
        # float32 chain of 8 ops cost a drafting round 2x more on the CPU.
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class Rotary:
    """NeoX-style rotary embedding at fixed positions, computed once per forward.

    Every draft layer rotates its queries and keys at the same positions, so
    the cos / sin rows are built once and shared (`at`), not per layer and head.
    """

    _inv_freq: dict = {}  # (head_dim, theta, device) -> [head_dim / 2] float32

    def __init__(self, positions: torch.Tensor, head_dim: int, theta: float):
        key = (head_dim, theta, positions.device)
        inv_freq = self._inv_freq.get(key)
        if inv_freq is None:
            exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
            inv_freq = self._inv_freq[key] = 1.0 / theta**exponent
        angles = (positions.float()[:, None] * inv_freq)[:, None, :]  # [T, 1, hd/2]
        self.cos, self.sin = angles.cos(), angles.sin()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, heads, head_dim] rotated; computed in float32, returned in x's dtype.
        (Serving on the CPU swaps in vLLM's kernel, which rotates x in place.)"""
        x1, x2 = x.float().chunk(2, dim=-1)
        cos, sin = self.cos, self.sin
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    def apply_pair(self, q: torch.Tensor, k: torch.Tensor):
        """Queries and keys rotated in one go (one pass over both heads' rows)."""
        return self.apply(torch.cat([q, k], dim=1)).split([q.shape[1], k.shape[1]], dim=1)


class Attention(nn.Module):
    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        H, Hkv, hd, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, hd
        self.q_proj = nn.Linear(d, H * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, Hkv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, Hkv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * hd, d, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    # The projections; serving swaps in one fused GEMM for each (vllm_integration.py).
    def project_qkv(self, x: torch.Tensor):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def project_kv(self, x: torch.Tensor):
        return self.k_proj(x), self.v_proj(x)

    def keys_values(self, x: torch.Tensor, rotary: Rotary):
        """K [T, Hkv, hd] (normed, rotated) and V [T, Hkv, hd] of x [T, d]."""
        k, v = self.project_kv(x)
        k = self.k_norm(k.view(-1, self.num_kv_heads, self.head_dim))
        return rotary.apply(k), v.view(-1, self.num_kv_heads, self.head_dim)

    def queries_keys_values(self, x: torch.Tensor, rotary: Rotary):
        """Q [T, H, hd], K, V [T, Hkv, hd] of x [T, d]; Q and K rotated in one go."""
        q, k, v = self.project_qkv(x)
        q = self.q_norm(q.view(-1, self.num_heads, self.head_dim))
        k = self.k_norm(k.view(-1, self.num_kv_heads, self.head_dim))
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = rotary.apply_pair(q, k)
        return q, k, v


class MLP(nn.Module):
    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class MarkovHead(nn.Module):
    """Shared by both heads: slot k's bias is W2(x_k) for a rank-r vector x_k of the
    previous token (and, for the RNN head, of the state); `low_rank` computes x_k."""

    def step(self, prev_tokens, hidden, state):
        """Bias [B, V] (model dtype) for the next slot, and the new state (training's form)."""
        x, state = self.low_rank(prev_tokens, hidden, state)
        return self.markov_w2(x), state

    def adder(self, dtype: torch.dtype):
        """Inference's form of `logits + step(...)` for logits of `dtype` (float32): one
        addmm in that dtype into `logits` itself (the round's own buffer: no copy of a
        [B, V] row block per slot), W2 cast once per weight version. Fewer, cheaper ops
        than a model-dtype GEMM and a mixed-dtype add, in the sequential loop that runs
        every drafting round; the round binds it (and so looks the casts up) once, before
        its loop over the block's slots. Returns add(logits, prev_tokens, hidden, state),
        which updates logits in place and returns it."""
        w2t = self._cast("markov_w2", dtype, True)

        def add(logits, prev_tokens, hidden, state):
            x, state = self.low_rank(prev_tokens, hidden, state)
            return logits.addmm_(x.to(dtype), w2t), state

        return add

    def _cast(self, name: str, dtype: torch.dtype, transpose: bool = False) -> torch.Tensor:
        """Weight `name` in `dtype` (transposed: [in, out], row-major), cast once per
        weight version: the inference loop reads it every slot of every round."""
        w = getattr(self, name).weight

        def build():
            t = w.detach().to(dtype)
            return t.t().contiguous() if transpose else t

        return derived_once(self, name, (w,), (dtype, transpose), build)


class VanillaMarkovHead(MarkovHead):
    """First-order token-to-token bias W2(W1[x_{k-1}]) (paper eq. 5)."""

    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        self.markov_w1 = nn.Embedding(cfg.vocab_size, cfg.markov_rank)
        self.markov_w2 = nn.Linear(cfg.markov_rank, cfg.vocab_size, bias=False)

    def init_state(self, batch: int, like: torch.Tensor):
        return None

    def low_rank(self, prev_tokens, hidden, state):
        return self.markov_w1.weight[prev_tokens], state  # = markov_w1(prev_tokens), without a module call

    def adder(self, dtype: torch.dtype):
        """MarkovHead.adder with W1 rows read from a copy in the logits' dtype (the
        same values: bfloat16 and float16 widen to float32 exactly), one op fewer per slot."""
        w1, w2t = self._cast("markov_w1", dtype), self._cast("markov_w2", dtype, True)
        return lambda logits, prev_tokens, hidden, state: (logits.addmm_(w1.index_select(0, prev_tokens), w2t), state)


class RNNMarkovHead(MarkovHead):
    """Gated recurrent head (paper eq. 6): the state carries the block's history.

    z_k = [s_{k-1}; W1[x_{k-1}]; h_k]; s_k = g*s_{k-1} + (1-g)*tanh(c);
    bias_k = W2(tanh(o)) with (g, c, o) = chunks of joint_proj(z_k).
    """

    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        r = cfg.markov_rank
        self.markov_w1 = nn.Embedding(cfg.vocab_size, r)
        self.markov_w2 = nn.Linear(r, cfg.vocab_size, bias=False)
        self.joint_proj = nn.Linear(2 * r + cfg.hidden_size, 3 * r)

    def init_state(self, batch: int, like: torch.Tensor):
        return like.new_zeros(batch, self.markov_w1.embedding_dim)

    def low_rank(self, prev_tokens, hidden, state):
        z = torch.cat([state, self.markov_w1(prev_tokens), hidden.to(state.dtype)], dim=-1)
        gate, cand, out = self.joint_proj(z).chunk(3, dim=-1)
        g = torch.sigmoid(gate)
        return torch.tanh(out), g * state + (1 - g) * torch.tanh(cand)


class ConfidenceHead(nn.Module):
    def __init__(self, in_features: int):
        super().__init__()
        self.proj = nn.Linear(in_features, 1)

    def forward(self, features):  # -> logit
        return self.proj(features).squeeze(-1)

    def scorer(self, markov_w1: torch.Tensor | None):
        """Inference's form of `forward([h ; W1[x]])` (W1 = markov_w1, None: features are h
        alone): score(hidden [..., d], prev_tokens [...]) -> float32 logits [...].

        The projection splits into w_h . h + w_m . W1[x] + b, and the second part is one
        number per token: table[x] = w_m . W1[x] + b, built once per weight version. A
        round then costs one addmv (table rows of the previous tokens + hidden @ w_h)
        instead of an embedding lookup, a concatenation and a one-column GEMM: 4 to 5x
        less on the CPU (3.9 against 19.9 us for 7 rows, one thread). Computed in float32,
        so it differs from `forward` in the model dtype by that dtype's rounding."""
        w = self.proj.weight[0]
        d = w.shape[0] - (0 if markov_w1 is None else markov_w1.shape[1])
        sources = (self.proj.weight, self.proj.bias) + (() if markov_w1 is None else (markov_w1,))

        def build():
            w_h = w[:d].detach().float()
            bias = self.proj.bias.detach().float()
            if markov_w1 is None:
                return w_h, bias.expand(1)
            return w_h, markov_w1.detach().float() @ w[d:].detach().float() + bias

        w_h, table = derived_once(self, "scorer", sources, (), build)

        def score(hidden: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
            rows = hidden.reshape(-1, d).float()
            per_token = table.index_select(0, prev_tokens.reshape(-1)) if markov_w1 is not None else table
            return torch.addmv(per_token, rows, w_h).view(prev_tokens.shape)

        return score


def derived_once(owner: nn.Module, name: str, sources: tuple[torch.Tensor, ...], options: tuple, build):
    """`build()` (tensors derived from the `sources` weights), cached on `owner` under `name`
    until a source changes (another tensor, or an in-place update: `_version` moves on) or
    `options` do. Inference reads these every round; training updates the weights."""
    key = tuple((t.data_ptr(), t._version, t.device) for t in sources) + options
    cached = owner.__dict__.setdefault("_derived", {}).get(name)
    if cached is None or cached[0] != key:
        cached = owner._derived[name] = key, build()
    return cached[1]


# attend(layer_index, q [Tq, H, hd], k [Tq, Hkv, hd], v [Tq, Hkv, hd]) -> [Tq, H*hd]
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DSparkDraftModel(nn.Module):
    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.fc = nn.Linear(cfg.fc_in_features, cfg.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.markov_head = None
        if cfg.markov_rank > 0:
            head_cls = RNNMarkovHead if cfg.markov_head_type == "rnn" else VanillaMarkovHead
            self.markov_head = head_cls(cfg)
        self.confidence_head = (
            ConfidenceHead(cfg.confidence_in_features) if cfg.enable_confidence_head else None
        )

    # -- context: target features -> per-layer K/V -------------------------
    def fuse_target_features(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """hidden_norm(fc(concat of target layer outputs)): [T, L*d_t] -> [T, d]."""
        return self.hidden_norm(self.fc(target_hidden))

    def rotary(self, positions: torch.Tensor) -> Rotary:
        return Rotary(positions, self.config.head_dim, self.config.rope_theta)

    def context_keys_values(self, fused: torch.Tensor, positions: torch.Tensor):
        """The K/V every draft layer sees for context tokens (no input_layernorm)."""
        rotary = self.rotary(positions)
        return [layer.self_attn.keys_values(fused, rotary) for layer in self.layers]

    # -- the parallel backbone over one block per request --------------------
    def block_input_ids(self, anchors: torch.Tensor) -> torch.Tensor:
        """[B] anchors -> [B, block_size] = [anchor, mask, ..., mask]."""
        ids = anchors.new_full((anchors.shape[0], self.config.block_size), self.config.mask_token_id)
        ids[:, 0] = anchors
        return ids

    def backbone(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        """Final-normed hidden states [T, d] of flattened block tokens [T]."""
        x = self.embed_tokens(input_ids)
        rotary = self.rotary(positions)
        for i, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            attn = layer.self_attn
            out = attend(i, *attn.queries_keys_values(h, rotary))
            x = x + attn.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x)

    def base_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    # -- heads -------------------------------------------------------------
    def markov_features(self, prev_tokens: torch.Tensor) -> torch.Tensor | None:
        if self.markov_head is None:
            return None
        return self.markov_head.markov_w1(prev_tokens)

    def confidence_logits(self, hidden: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor | None:
        """Logit of slot k's survival from [h_k ; W1[x_{k-1}]] (never x_k itself)."""
        if self.confidence_head is None:
            return None
        feats = hidden
        if self.config.confidence_head_with_markov:
            feats = torch.cat([hidden, self.markov_features(prev_tokens).to(hidden.dtype)], dim=-1)
        return self.confidence_head(feats).float()

    def inference_confidence_logits(self, hidden: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor | None:
        """`confidence_logits` in the drafting round's form (`ConfidenceHead.scorer`), without grad."""
        if self.confidence_head is None:
            return None
        w1 = self.markov_head.markov_w1.weight if self.config.confidence_head_with_markov else None
        return self.confidence_head.scorer(w1)(hidden, prev_tokens)


def init_draft(cfg: DSparkConfig, embed: torch.Tensor, lm_head: torch.Tensor, seed: int,
               std: float = 0.02) -> DSparkDraftModel:
    """DeepSpec's initialisation: N(0, std) weights, zero biases, unit norms, and
    copies of the target's embedding and LM head."""
    torch.manual_seed(seed)
    model = DSparkDraftModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)
        model.embed_tokens.weight.copy_(embed)
        model.lm_head.weight.copy_(lm_head)
    return model


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dense attention in float32, each K/V head shared by H / Hkv query heads (GQA).

    q [..., H, T, hd], k / v [..., Hkv, S, hd], mask (True = attend) broadcastable
    to [..., H, T, S]. The reference for training and for tests; serving attends
    through vLLM's paged kernels instead. 4-D inputs ([B, H, T, hd]) let PyTorch
    pick its fused CPU kernel: about 1.8x faster forward + backward than 3-D ones.
    """
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)


def dense_block_attention(ctx_k, ctx_v, ctx_len: torch.Tensor, block_size: int) -> AttendFn:
    """Reference attention: each request's block attends to its own context and block.

    ctx_k/ctx_v: per layer, [B, S, Hkv, hd] padded context K/V; ctx_len [B].
    Queries arrive flattened as [B*block_size, H, hd]. Inside a block attention
    is bidirectional; context positions >= ctx_len are masked.
    """

    def attend(i, q, k, v):
        B = ctx_len.shape[0]
        H, hd = q.shape[1], q.shape[2]
        q = q.view(B, block_size, H, hd).transpose(1, 2)
        keys = torch.cat([ctx_k[i], k.view(B, block_size, *k.shape[1:])], dim=1).transpose(1, 2)
        vals = torch.cat([ctx_v[i], v.view(B, block_size, *v.shape[1:])], dim=1).transpose(1, 2)
        S = ctx_k[i].shape[1]
        valid = torch.arange(S + block_size, device=q.device)[None, :] < (ctx_len[:, None])
        valid[:, S:] = True
        out = grouped_query_attention(q, keys, vals, valid[:, None, None, :])
        return out.transpose(1, 2).reshape(B * block_size, H * hd).to(q.dtype)

    return attend
