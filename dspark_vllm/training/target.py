"""The target's side of training: hidden-state features from a Hugging Face model.

A DSpark drafter reads the outputs of the target layers `target_layer_ids`
(concatenated, before the final norm) for every context token, and learns the
target's next-token distribution, which is `lm_head(last_hidden)` where
`last_hidden` is the target's final-normed hidden state. Both come out of one
forward pass here; the serving side gets the same features from vLLM
(aux hidden states, see vllm_integration.py).
"""

from __future__ import annotations

import torch

from ..model.config import check_target_layer_ids


@torch.no_grad()
def target_features(target, input_ids: torch.Tensor, layer_ids: list[int]):
    """Return (features [B, S, len(layer_ids)*d], last_hidden [B, S, d]) for input_ids [B, S].

    HF's hidden_states[0] is the embedding output and hidden_states[l + 1] the
    output of layer l; the very last entry is already final-normed, so a
    drafter must not read the last layer through it.
    """
    check_target_layer_ids(layer_ids, target.config.num_hidden_layers)
    out = target.model(input_ids=input_ids, output_hidden_states=True)
    features = torch.cat([out.hidden_states[l + 1] for l in layer_ids], dim=-1)
    return features, out.last_hidden_state


@torch.no_grad()
def target_logits(target, last_hidden: torch.Tensor) -> torch.Tensor:
    """The target's next-token logits from its final-normed hidden state (fp32)."""
    return target.lm_head(last_hidden).float()
