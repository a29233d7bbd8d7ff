"""The plugin's options (`additional_config={"dspark": {...}}`) and engine kwargs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .model.config import DSparkConfigError, explain_validation_error

PROPOSER_PATH = "dspark_vllm.DSparkProposer"
# The verification policies (dspark_vllm/policies.py); the names live here only.
POLICIES = ("fixed", "threshold", "sync", "async")
NEEDS_CONFIDENCES = ("threshold", "sync", "async")
DEFAULT_PAIR = Path(__file__).parent / "assets" / "default_pair"
# num_speculative_tokens that engine_kwargs gives prompt lookup (or the block size, if larger):
# its blocks may run past the drafter's. Chosen on the default pair's calibration prompts
# (scripts/replay_drafts.py --lookup-tokens): answers of 128 tokens emit 4.24 / 4.88 / 5.10 /
# 5.23 tokens a step at 7 / 15 / 23 / 31, and at c=1 verifying 24 tokens costs about what 8 do.
LOOKUP_NUM_SPECULATIVE_TOKENS = 23


def demo_paths() -> dict[str, str]:
    """The embedded default model pair (see assets/default_pair/README.md)."""
    paths = {"target": DEFAULT_PAIR / "target", "dspark": DEFAULT_PAIR / "dspark",
             "dflash": DEFAULT_PAIR / "dflash", "calibration": DEFAULT_PAIR / "calibration.json",
             "prompts": DEFAULT_PAIR / "prompts" / "heldout.jsonl"}
    missing = [k for k, v in paths.items() if not v.exists()]
    if missing:
        raise FileNotFoundError(
            f"default model pair incomplete, missing {missing} under {DEFAULT_PAIR}; "
            "rebuild it with scripts/make_default_pair.sh")
    return {k: str(v) for k, v in paths.items()}


class RefinementOptions(BaseModel):
    """Online STS refinement (dspark_vllm/refinement.py); `{}` takes the defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    every: int = Field(1024, ge=1)  # re-fit after this many verified rounds
    window: int = Field(8192, ge=1)  # ... on the last this many rounds
    max_change: float = Field(0.25, gt=0.0, le=10.0)  # a temperature moves at most x(1 + max_change) per re-fit
    bins: int = Field(15, ge=2)  # ECE bins of the fit

    @model_validator(mode="after")
    def _window_holds_a_refit(self):
        if self.window < self.every:
            raise ValueError(f"refinement.window={self.window} must be >= refinement.every={self.every}: "
                             "each re-fit needs the rounds since the last one")
        return self


class PromptLookupOptions(BaseModel):
    """Prompt lookup beside the drafter (dspark_vllm/lookup.py); `{}` takes the defaults,
    those of the bench's `ngram` peer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_n: int = Field(2, ge=1)  # shortest n-gram that may match
    max_n: int = Field(4, ge=1)  # longest n-gram tried (the longest match wins)
    # Take lookup's block only where the drafter's calibrated confidence at the first slot
    # where the two differ is below this (1.0: wherever the rule allows; needs a confidence head).
    max_confidence: float = Field(0.9, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _range(self):
        if self.max_n < self.min_n:
            raise ValueError(f"prompt_lookup.max_n={self.max_n} must be >= prompt_lookup.min_n={self.min_n}")
        return self


class DSparkOptions(BaseModel):
    """Everything the plugin reads from `additional_config["dspark"]`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    draft_model: str
    # fixed: verify the whole block; threshold: stop where survival < threshold;
    # sync: Algorithm 1 (greedy admission, early stop); async: section 5.2 budget.
    verification: Literal[POLICIES] = "fixed"
    threshold: float = 0.5
    # async: age in steps of the confidences that set the budget (paper: 2).
    async_delay: int = 2
    # STS calibration JSON from scripts/calibrate.py (per-position temperatures).
    calibration: str | None = None
    # Online STS refinement while serving (None: off), starting from `calibration` (or T = 1).
    refinement: RefinementOptions | None = None
    # Engine cost table SPS(B) to use instead of profiling at start (see configs/).
    sps_profile: str | None = None
    # Where measured SPS tables are cached (default ~/.cache/dspark_vllm/sps).
    sps_cache_dir: str | None = None
    # Break-even guard (sync / async, or any policy given an sps_profile): skip the
    # drafter in steps where speculation is not expected to beat plain decoding.
    break_even: bool = True
    # dtype of the drafter's weights and GEMMs. model: the engine's dtype. float32:
    # K/V are cast to the cache's dtype where they enter vLLM's paged cache, and the
    # drafter no longer shares the target's embedding / LM head (their copies take
    # 4 bytes a weight). auto: float32 on x86 CPUs without native bf16 / fp16 GEMMs
    # (no AVX512-BF16 or AMX: there torch emulates a bf16 GEMM, about 6x the float32
    # one at a drafting round's 8 rows), else the model dtype.
    draft_dtype: Literal["auto", "model", "float32"] = "auto"
    # Prompt lookup beside the drafter (None: off): a greedy request takes the block that
    # the n-gram lookup of its own text proposes where that agrees with the drafter's
    # first token and runs longer (dspark_vllm/lookup.py).
    prompt_lookup: PromptLookupOptions | None = None


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
        raise DSparkConfigError(
            f"additional_config['dspark'].{explain_validation_error(e)}. "
            f"Known fields: {', '.join(DSparkOptions.model_fields)}."
        ) from None


def engine_kwargs(draft_model: str, num_speculative_tokens: int | None = None,
                  verification: str = "fixed", **options) -> dict:
    """Keyword arguments for `vllm.LLM(model=TARGET, **engine_kwargs(DRAFT))`.

    `num_speculative_tokens` defaults to the checkpoint's block size; with
    `prompt_lookup` it may exceed it (lookup's blocks run up to it, lookup.py) and
    defaults to LOOKUP_NUM_SPECULATIVE_TOKENS (or the block size, if larger).
    `verification` names the policy ("fixed", "threshold", "sync" or "async");
    further options (threshold=0.6, calibration=PATH, sps_profile=PATH) go into
    additional_config["dspark"]. Paths are made absolute.
    """
    from .model.checkpoint import check_num_speculative_tokens
    from .model.config import DSparkConfig

    cfg = DSparkConfig.from_pretrained(draft_model)
    lookup = options.get("prompt_lookup") is not None
    if lookup and num_speculative_tokens is None:
        num_speculative_tokens = max(cfg.block_size, LOOKUP_NUM_SPECULATIVE_TOKENS)
    k = check_num_speculative_tokens(cfg, num_speculative_tokens, lookup)
    for key in ("calibration", "sps_profile", "sps_cache_dir"):
        if options.get(key) is not None:
            options[key] = str(Path(options[key]).resolve())
    dspark = DSparkOptions(draft_model=str(Path(draft_model).resolve()), verification=verification, **options)
    return {
        "speculative_config": {"method": "custom_class", "model": PROPOSER_PATH,
                               "num_speculative_tokens": k},
        "additional_config": {"dspark": dspark.model_dump(exclude_none=True)},
    }


def serve_flags(draft_model: str, **kw) -> list[str]:
    """The same settings as command-line flags for `vllm serve` / the API server."""
    kwargs = engine_kwargs(draft_model, **kw)
    return ["--speculative-config", json.dumps(kwargs["speculative_config"]),
            "--additional-config", json.dumps(kwargs["additional_config"])]
