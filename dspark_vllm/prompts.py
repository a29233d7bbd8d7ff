"""Prompt files: one `{"turns": ["first user turn", ...]}` JSON object per line.

This is the format of the paper's evaluation sets (`shared/datasets/*.jsonl`)
and of the default pair's prompt files. Only the first turn is used. A chat
model gets it wrapped in its chat template; `raw=True` feeds the text as is,
for base or code models that continue text.
"""

from __future__ import annotations

import json
from pathlib import Path


def load_turns(path: str | Path, limit: int | None = None) -> list[str]:
    turns = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                turn = record["turns"][0]
            except (ValueError, KeyError, IndexError, TypeError):
                raise ValueError(f"{path}:{i}: expected a JSON object with a non-empty 'turns' list "
                                 f'like {{"turns": ["..."]}}') from None
            if not isinstance(turn, str):
                raise ValueError(f"{path}:{i}: turns[0] must be a string")
            turns.append(turn)
            if limit is not None and len(turns) >= limit:
                break
    return turns


def prompt_token_ids(tokenizer, turn: str, raw: bool = False, **template_kwargs) -> list[int]:
    """Token ids for one first turn: raw text, or the chat template's generation prompt.

    template_kwargs go to the chat template (e.g. enable_thinking for Qwen3).
    """
    if raw or not tokenizer.chat_template:
        return tokenizer(turn).input_ids
    text = tokenizer.apply_chat_template([{"role": "user", "content": turn}],
                                         add_generation_prompt=True, tokenize=False, **template_kwargs)
    return tokenizer(text, add_special_tokens=False).input_ids  # the template has the specials
