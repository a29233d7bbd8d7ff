"""The plugin's options (`additional_config={"dspark": {...}}`) and engine kwargs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .model.config import DSparkConfigError

PROPOSER_PATH = "dspark_vllm.DSparkProposer"


class DSparkOptions(BaseModel):
    """Everything the plugin reads from `additional_config["dspark"]`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    draft_model: str
    verification: Literal["fixed", "threshold"] = "fixed"
    threshold: float = 0.5


def options_from_additional_config(additional_config: dict | None) -> DSparkOptions:
    raw = (additional_config or {}).get("dspark")
    if raw is None:
        raise DSparkConfigError(
            "additional_config['dspark'] is missing: pass "
            "additional_config={'dspark': {'draft_model': PATH}} (or --additional-config "
            "'{\"dspark\": {\"draft_model\": \"PATH\"}}'); dspark_vllm.engine_kwargs() builds it."
        )
    try:
        return DSparkOptions(**raw)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise DSparkConfigError(
            f"additional_config['dspark'].{field}: {first['msg']} (got {first.get('input')!r}). "
            f"Known fields: {', '.join(DSparkOptions.model_fields)}."
        ) from None


def engine_kwargs(draft_model: str, num_speculative_tokens: int | None = None,
                  verification: str = "fixed", **options) -> dict:
    """Keyword arguments for `vllm.LLM(model=TARGET, **engine_kwargs(DRAFT))`.

    `num_speculative_tokens` defaults to the checkpoint's block size.
    `verification` names the policy ("fixed" or "threshold"); further options
    (e.g. threshold=0.6) go into additional_config["dspark"].
    """
    from .model.checkpoint import check_num_speculative_tokens
    from .model.config import DSparkConfig

    cfg = DSparkConfig.from_pretrained(draft_model)
    k = check_num_speculative_tokens(cfg, num_speculative_tokens)
    dspark = DSparkOptions(draft_model=str(Path(draft_model).resolve()), verification=verification, **options)
    return {
        "speculative_config": {"method": "custom_class", "model": PROPOSER_PATH,
                               "num_speculative_tokens": k},
        "additional_config": {"dspark": dspark.model_dump()},
    }


def serve_flags(draft_model: str, **kw) -> list[str]:
    """The same settings as command-line flags for `vllm serve` / the API server."""
    kwargs = engine_kwargs(draft_model, **kw)
    return ["--speculative-config", json.dumps(kwargs["speculative_config"]),
            "--additional-config", json.dumps(kwargs["additional_config"])]
