"""The DSpark draft configuration, read from a DeepSpec-format `config.json`.

DeepSpec writes the draft config as a copy of the target's Qwen3 config plus
a few DSpark keys (`block_size`, `target_layer_ids`, `mask_token_id`,
`markov_rank`, `markov_head_type`, `enable_confidence_head`,
`confidence_head_with_markov`). We read exactly those keys and nothing more.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


class DSparkConfigError(ValueError):
    """A draft checkpoint, option or calibration file is unusable.

    The message always names the offending field and says how to fix it.
    """


MARKOV_HEAD_TYPES = ("vanilla", "rnn")


@dataclass(frozen=True)
class DSparkConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    block_size: int
    target_layer_ids: tuple[int, ...]
    mask_token_id: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    attention_bias: bool = False
    markov_rank: int = 0
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = False
    confidence_head_with_markov: bool = False
    target_hidden_size: int | None = None
    num_target_layers: int | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def fc_in_features(self) -> int:
        return (self.target_hidden_size or self.hidden_size) * len(self.target_layer_ids)

    @property
    def confidence_in_features(self) -> int:
        extra = self.markov_rank if self.confidence_head_with_markov else 0
        return self.hidden_size + extra

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "DSparkConfig":
        def need(key):
            if key not in d:
                raise DSparkConfigError(
                    f"{source}: missing field '{key}'. A DeepSpec DSpark draft config "
                    f"copies the target's Qwen3 config and adds the DSpark keys; "
                    f"add '{key}' or point at the right checkpoint."
                )
            return d[key]

        rope = d.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", d.get("rope_theta", 1_000_000.0))
        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        markov_rank = int(d.get("markov_rank", 0) or 0)
        head_type = d.get("markov_head_type", "vanilla") if markov_rank else "vanilla"
        if head_type not in MARKOV_HEAD_TYPES:
            raise DSparkConfigError(
                f"{source}: 'markov_head_type' is {head_type!r}; supported: "
                f"{', '.join(MARKOV_HEAD_TYPES)}."
            )
        layer_ids = need("target_layer_ids")
        if not isinstance(layer_ids, list) or not layer_ids or any(
            not isinstance(i, int) for i in layer_ids
        ):
            raise DSparkConfigError(
                f"{source}: 'target_layer_ids' must be a non-empty list of ints, got {layer_ids!r}."
            )
        if sorted(set(layer_ids)) != list(layer_ids):
            raise DSparkConfigError(
                f"{source}: 'target_layer_ids' must be strictly increasing, got {layer_ids}."
            )
        block_size = int(need("block_size"))
        if block_size < 1:
            raise DSparkConfigError(f"{source}: 'block_size' must be >= 1, got {block_size}.")
        enable_conf = bool(d.get("enable_confidence_head", False))
        return cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads", heads)),
            head_dim=int(d.get("head_dim") or hidden // heads),
            block_size=block_size,
            target_layer_ids=tuple(layer_ids),
            mask_token_id=int(need("mask_token_id")),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            attention_bias=bool(d.get("attention_bias", False)),
            markov_rank=markov_rank,
            markov_head_type=head_type,
            enable_confidence_head=enable_conf,
            confidence_head_with_markov=enable_conf and bool(d.get("confidence_head_with_markov", False)),
            target_hidden_size=d.get("target_hidden_size"),
            num_target_layers=d.get("num_target_layers"),
            raw=dict(d),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "DSparkConfig":
        path = Path(path)
        cfg_file = path / "config.json"
        if not path.exists():
            raise DSparkConfigError(
                f"draft_model: path '{path}' does not exist. Pass the folder of a "
                f"DeepSpec-format DSpark checkpoint (config.json + model.safetensors)."
            )
        if not cfg_file.is_file():
            raise DSparkConfigError(
                f"draft_model: '{path}' has no config.json. Pass the folder of a "
                f"DeepSpec-format DSpark checkpoint (config.json + model.safetensors)."
            )
        try:
            d = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise DSparkConfigError(f"{cfg_file}: not valid JSON ({e}).") from e
        return cls.from_dict(d, source=str(cfg_file))


def draft_config_for(target_cfg, block_size: int = 7, num_layers: int = 2, markov_rank: int = 16,
                     target_layer_ids=None, confidence: bool = True, head_type: str = "vanilla",
                     mask_token_id: int | None = None) -> DSparkConfig:
    """A DeepSpec-style draft config for a Hugging Face target config: the target's
    config plus the DSpark keys (training and the test fixtures build drafters with it)."""
    d = target_cfg.to_dict()
    n = target_cfg.num_hidden_layers
    d.update(
        architectures=["Qwen3DSparkModel"],
        num_target_layers=n,
        num_hidden_layers=num_layers,
        block_size=block_size,
        tie_word_embeddings=False,
        layer_types=["full_attention"] * num_layers,
        mask_token_id=mask_token_id if mask_token_id is not None else target_cfg.vocab_size - 1,
        target_layer_ids=list(target_layer_ids or range(0, n - 1)),
        enable_confidence_head=confidence,
        markov_rank=markov_rank,
    )
    d["rope_parameters"] = {"rope_theta": getattr(target_cfg, "rope_theta", None)
                            or (target_cfg.rope_parameters or {}).get("rope_theta", 1e6),
                            "rope_type": "default"}
    if confidence:
        d["confidence_head_with_markov"] = markov_rank > 0
    if markov_rank:
        d["markov_head_type"] = head_type
    return DSparkConfig.from_dict(json.loads(json.dumps(d, default=str)))


def check_target_layer_ids(layer_ids, num_target_layers: int, source: str = "target_layer_ids") -> None:
    """The one rule for the target layers a drafter reads: strictly increasing ids in
    -1 .. num_target_layers - 2, where -1 is the embedding output and l the output of
    layer l (the last layer's output is final-normed in HF and is not allowed)."""
    layer_ids = list(layer_ids)
    bad = [i for i in layer_ids if not -1 <= i < num_target_layers - 1]
    if bad or sorted(set(layer_ids)) != layer_ids:
        raise DSparkConfigError(
            f"{source}: 'target_layer_ids' {layer_ids} must be strictly increasing layers in "
            f"[-1, {num_target_layers - 2}] for a target with {num_target_layers} layers "
            f"(-1 is the embedding output; the last layer is not allowed)."
        )


# -- user messages for pydantic validation errors (one wording everywhere) ----------

def field_path(loc) -> str:
    """('table', 3, 'sps') -> 'table[3].sps'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_MESSAGES = {  # pydantic error type -> what to say after the field name
    "missing": "is missing",
    "too_short": "must have at least {min_length} entries",
    "greater_than": "must be > {gt:g}",
    "greater_than_equal": "must be >= {ge:g}",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "int_parsing": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "dict_type": "must be a JSON object",
    "model_type": "must be a JSON object",
    "list_type": "must be a list",
    "literal_error": "must be {expected}",
}


def explain_validation_error(error, known_fields=()) -> str:
    """'field what-is-wrong (got X)' for the first error of a pydantic ValidationError.

    Checks across fields (model validators) keep their own message, which names
    the fields; `known_fields` are listed when a field is not one of them.
    """
    err = error.errors()[0]
    field, kind = field_path(err["loc"]), err["type"]
    if kind == "value_error":
        return str(err["ctx"]["error"])
    if kind == "model_type" and not err["loc"]:
        return "the file must hold one JSON object"
    if kind == "extra_forbidden":
        what = "is not a known field" + (f" (known: {', '.join(known_fields)})" if known_fields else "")
    else:
        what = _MESSAGES.get(kind, err["msg"]).format(**err.get("ctx", {}))
    got = "" if kind in ("missing", "extra_forbidden") else f" (got {err.get('input')!r})"
    return f"{field} {what}{got}"
