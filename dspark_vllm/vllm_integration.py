"""Everything that touches vLLM 0.32's private internals lives in this file.

The route (see README "How it plugs into vLLM"):
- the user passes `speculative_config={"method": "custom_class", "model":
  "dspark_vllm.DSparkProposer", ...}` and `additional_config={"dspark": {...}}`;
- `install()` (run by the `vllm.general_plugins` entry point in every vLLM
  process) wraps the platform's `check_and_update_config` so that such a config
  gets our worker and scheduler classes filled in, and the draft checkpoint is
  checked in the user's own process before any engine starts;
- `DSparkScheduler` reserves block_size look-ahead KV slots per request: the
  draft block writes its K/V there;
- the worker installs `DSparkModelRunner` (a subclass of the V1 runner) which
  asks the target for the hidden states of the draft's target layers, feeds
  them to the drafter, and swaps in `DSparkRejectionSampler`, our exact
  verification step.
"""

from __future__ import annotations

import functools
import os
import platform
import threading
import time
from collections import deque
from dataclasses import dataclass, replace

import numpy as np

import torch
from vllm.logger import init_logger

from . import sps as sps_profile
from .calibration import ConfidenceMap, calibrated_logits, load_calibration, scaled_maps
from .config import DSparkOptions, PROPOSER_PATH, options_from_additional_config
from .guard import BreakEvenGuard
from .lookup import LookupChoice, choose
from .metrics import DSparkPrometheus, EngineStats, StatsReport
from .model.checkpoint import TargetInfo, load_draft_model, validate_checkpoint
from .model.config import DSparkConfig, DSparkConfigError
from .policies import check_policy, make_policy
from .refinement import OnlineCalibration
from .proposer import PendingContext, draft_block
from .sampling import SamplingRows, process_logits
from .verification import PLACEHOLDER, verify, verify_greedy, verify_greedy_uniform

logger = init_logger("vllm.dspark")  # under vLLM's logger so its handlers apply
IDLE_S = 1.0  # a pause between engine steps longer than this is idleness, not step cost

# ---------------------------------------------------------------------------
# Config hook: fill in worker / scheduler classes, fail early on bad input.
# ---------------------------------------------------------------------------

_WORKERS = {
    "vllm.v1.worker.cpu_worker.CPUWorker": "dspark_vllm.vllm_integration.DSparkCPUWorker",
    "vllm.v1.worker.gpu_worker.Worker": "dspark_vllm.vllm_integration.DSparkGPUWorker",
}
_SCHEDULER = "dspark_vllm.vllm_integration.DSparkScheduler"


def uses_dspark(vllm_config) -> bool:
    return _is_dspark_spec(vllm_config.speculative_config)


def _is_dspark_spec(spec) -> bool:
    return spec is not None and spec.method == "custom_class" and spec.model in (
        PROPOSER_PATH, "dspark_vllm.vllm_integration.DSparkProposer")


def configure(vllm_config) -> None:
    """Complete and check a vLLM config that asks for DSpark (idempotent)."""
    if not uses_dspark(vllm_config):
        return
    options = options_from_additional_config(vllm_config.additional_config)
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        # vLLM builds drafters on the last pipeline stage only, which holds the hidden
        # states of its own layers; the drafter reads layers spread over the whole model.
        raise ValueError(
            "DSpark does not support pipeline_parallel_size > 1: the drafter reads hidden states "
            "of target layers from every pipeline stage, and vLLM runs drafters on the last stage "
            "only. Use tensor_parallel_size to split the target instead.")
    draft_config = validate_checkpoint(
        options.draft_model,
        TargetInfo.from_hf_config(vllm_config.model_config.hf_config),
        vllm_config.speculative_config.num_speculative_tokens,
        prompt_lookup=options.prompt_lookup is not None,
    )
    if options.calibration:
        load_calibration(options.calibration, draft_config.block_size)
    if options.sps_profile:
        sps_profile.load_profile(options.sps_profile)
    check_policy(options.verification, options.model_dump(), draft_config.enable_confidence_head)
    if options.refinement is not None and not draft_config.enable_confidence_head:
        raise DSparkConfigError(
            f"additional_config['dspark'].refinement: {options.draft_model} has no confidence head, so there "
            "are no confidences to calibrate; drop 'refinement' or use a DSpark checkpoint with one.")
    parallel = vllm_config.parallel_config
    if parallel.worker_cls in _WORKERS:
        parallel.worker_cls = _WORKERS[parallel.worker_cls]
    sched = vllm_config.scheduler_config
    if sched.scheduler_cls in (None, "vllm.v1.core.sched.scheduler.Scheduler"):
        sched.scheduler_cls = _SCHEDULER


def install() -> None:
    """Wrap the current platform's check_and_update_config once per process."""
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    original = platform_cls.check_and_update_config
    if getattr(original, "_dspark_wrapped", False):
        return

    @functools.wraps(original)
    def check_and_update_config(vllm_config) -> None:
        original(vllm_config)
        configure(vllm_config)

    check_and_update_config._dspark_wrapped = True
    platform_cls.check_and_update_config = staticmethod(check_and_update_config)
    _allow_min_p_and_logit_bias()
    _add_stat_logger()
    _skip_draft_rpc()


def _skip_draft_rpc() -> None:
    """vLLM's engine core fetches each step's drafts from the worker with a call of its
    own after the step (`post_step` -> `take_draft_token_ids`): one more round trip to
    the worker process per step, 0.48 ms of a 6.2 ms step at c=1 on the CPU. A DSpark
    worker sends them with the step's output instead (`DSparkRunnerMixin.sample_tokens`)
    and DSparkScheduler applies them; the fetch is skipped only for a step whose drafts
    arrived that way, so any other route (async scheduling, pipeline stages) keeps it."""
    from vllm.v1.engine.core import EngineCore

    original = EngineCore.post_step
    if getattr(original, "_dspark_wrapped", False):
        return

    @functools.wraps(original)
    def post_step(self, model_executed: bool) -> None:
        if getattr(self.scheduler, "dspark_drafts_taken", False):
            self.scheduler.dspark_drafts_taken = False
            return
        original(self, model_executed)

    post_step._dspark_wrapped = True
    EngineCore.post_step = post_step


def _allow_min_p_and_logit_bias() -> None:
    """vLLM 0.32 refuses min_p and logit_bias with any speculative decoding (its rejection
    sampler cannot apply them); DSpark's verification applies both exactly, so requests
    to a DSpark engine keep them. Other speculative methods keep vLLM's check."""
    from vllm.sampling_params import SamplingParams

    original = SamplingParams._validate_spec_decode
    if getattr(original, "_dspark_wrapped", False):
        return

    @functools.wraps(original)
    def _validate_spec_decode(self, speculative_config) -> None:
        if not _is_dspark_spec(speculative_config):
            original(self, speculative_config)

    _validate_spec_decode._dspark_wrapped = True
    SamplingParams._validate_spec_decode = _validate_spec_decode


def _add_stat_logger() -> None:
    """Give every DSpark engine's front end (LLMEngine and AsyncLLM alike) the DSpark stat
    logger, first in line, so that vLLM's own loggers see SchedulerStats without our report.

    vLLM's `vllm.stat_logger_plugins` entry point would reach AsyncLLM only, and it turns
    stats on for every AsyncLLM in the environment, DSpark or not, even under
    --disable-log-stats. Here nothing changes for other engines, and a DSpark engine
    with stats off has neither vLLM's metrics nor ours (the scheduler then sends none)."""
    import inspect

    from vllm.v1.metrics.loggers import StatLoggerManager

    original = StatLoggerManager.__init__
    if getattr(original, "_dspark_wrapped", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs) -> None:
        bound = signature.bind(self, *args, **kwargs)
        if uses_dspark(bound.arguments["vllm_config"]):
            bound.arguments["custom_stat_loggers"] = [
                DSparkStatLogger, *(bound.arguments.get("custom_stat_loggers") or [])]
        original(*bound.args, **bound.kwargs)

    __init__._dspark_wrapped = True
    StatLoggerManager.__init__ = __init__


# ---------------------------------------------------------------------------
# Scheduler: reserve the look-ahead slots the draft block writes.
# ---------------------------------------------------------------------------

from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402


class DSparkScheduler(Scheduler):
    """vLLM's scheduler with `num_lookahead_tokens` = the draft block size.

    vLLM reserves look-ahead slots only for its built-in drafters. Our draft
    block [anchor, mask...] occupies positions anchor..anchor+block_size-1, so
    every allocation must cover them. vLLM's __init__ assigns the attribute and
    derives its per-step block budget from it; the property makes both see ours.
    """

    def __init__(self, vllm_config, *args, **kwargs):
        options = options_from_additional_config(vllm_config.additional_config)
        self._dspark_lookahead = DSparkConfig.from_pretrained(options.draft_model).block_size
        self._dspark_rejected_draft: dict[str, int] = {}  # req_id -> index of its kept invalid draft
        self._dspark_report = StatsReport()  # the worker's counters -> reports in SchedulerStats
        super().__init__(vllm_config, *args, **kwargs)

    @property
    def num_lookahead_tokens(self) -> int:
        return self._dspark_lookahead

    @num_lookahead_tokens.setter
    def num_lookahead_tokens(self, value: int) -> None:
        pass  # vLLM's own value (0 for custom_class) is superseded

    # -- the step's output: counters for the front end, the next round's drafts ----
    dspark_drafts_taken = False  # this step's drafts came with its output (no post-step fetch)

    def update_from_output(self, scheduler_output, model_runner_output):
        """vLLM's update; with stats on, the step's SchedulerStats also carry DSpark's
        report; then the drafts that came with the output go to their requests.

        The driver worker attached its counters and drafts to the step's output
        (`DSparkRunnerMixin.sample_tokens`); vLLM sends SchedulerStats to one
        front end per step, so the report goes there (see metrics.py)."""
        snapshot = getattr(model_runner_output, "dspark_stats", None)
        if snapshot is not None and self.log_stats:
            self._dspark_report.observe(snapshot)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if self.log_stats:
            for eco in outputs.values():
                if eco.scheduler_stats is not None:
                    report = self._dspark_report.take()
                    if report is not None:
                        attach_report(eco.scheduler_stats, report)
                    break
        # The next round's drafts, where the worker sent them with this step's output:
        # what vLLM's post-step call would fetch, applied at the same point (after the
        # update), without that extra round trip to the worker (see _skip_draft_rpc).
        drafts = getattr(model_runner_output, "dspark_draft_token_ids", None)
        if scheduler_output.total_num_scheduled_tokens == 0:
            drafts = None  # vLLM fetches only after a step that ran the model
        self.dspark_drafts_taken = drafts is not None
        if drafts is not None:
            self.update_draft_token_ids(drafts)
        return outputs

    # -- structured output: a grammar's cut of a sampled draft is a rejection ----
    #
    # vLLM cuts a request's drafts before the first token its grammar rejects,
    # and samples that position from the target p as a bonus. For a greedy
    # (argmax) draft that is exact. A draft sampled from q at temperature > 0 is
    # random, and exact speculative sampling would reject the invalid token
    # (p = 0 there) and sample the residual (p - q)+ instead of p: cutting it
    # over-weights the tokens q under-covers (tests/test_structured_output.py:
    # second-token chi-square p = 1e-36 without this). So sampled requests keep
    # their first invalid draft; verification rejects it surely and samples the
    # residual. (vLLM's async-scheduling path, update_draft_token_ids_in_output,
    # is not covered: the CPU platform never uses it.)

    def update_draft_token_ids(self, draft_token_ids) -> None:
        from vllm.sampling_params import SamplingType

        if any(draft_token_ids.draft_token_ids):
            # (Where nobody drafted, the guard skipped the drafter: scheduling emptied every
            # request's drafts already, and vLLM's per-request update would only set [] again.)
            super().update_draft_token_ids(draft_token_ids)
        rejected = self._dspark_rejected_draft
        for req_id, drafts in zip(draft_token_ids.req_ids, draft_token_ids.draft_token_ids):
            rejected.pop(req_id, None)
            if not drafts:
                continue
            request = self.requests.get(req_id)
            if (request is None or request.is_finished() or request.is_prefill_chunk
                    or not request.use_structured_output or request.sampling_params is None
                    or request.sampling_params.sampling_type == SamplingType.GREEDY):
                continue
            valid = len(request.spec_token_ids)
            if valid < len(drafts) and drafts[valid] >= 0:
                request.spec_token_ids = list(request.spec_token_ids) + [drafts[valid]]
                rejected[req_id] = valid

    def get_grammar_bitmask(self, scheduler_output):
        """vLLM's bitmask, built without the kept invalid drafts (vLLM logs an error for
        a draft its grammar rejects); each such draft's row is the grammar state after
        the valid prefix (the bonus row vLLM built), and its own bonus row repeats it."""
        rejected = self._dspark_rejected_draft
        if not rejected:
            return super().get_grammar_bitmask(scheduler_output)
        spec = scheduler_output.scheduled_spec_decode_tokens
        kept = {}
        for req_id, valid in list(rejected.items()):
            tokens = spec.get(req_id)
            if tokens is not None and len(tokens) == valid + 1:
                kept[req_id] = tokens
                spec[req_id] = tokens[:valid]
            if tokens is not None or req_id not in self.requests:
                del rejected[req_id]  # scheduled now (or gone): used once
        try:
            out = super().get_grammar_bitmask(scheduler_output)
        finally:
            spec.update(kept)
        if out is None or not kept:
            return out
        parts, start = [], 0
        for req_id in out.structured_output_request_ids:
            n = 1 + len(spec.get(req_id, ())) - (req_id in kept)
            parts.append(out.grammar_bitmask[start:start + n])
            if req_id in kept:
                parts.append(out.grammar_bitmask[start + n - 1:start + n])
            start += n
        out.grammar_bitmask = np.concatenate(parts)
        return out


# ---------------------------------------------------------------------------
# Metrics in the front end: the report travels in SchedulerStats.kv_connector_stats,
# the one free-form field (dict[str, Any]) vLLM's serializer carries as plain data.
# ---------------------------------------------------------------------------

REPORT_KEY = "__dspark__"


def attach_report(scheduler_stats, report: dict) -> None:
    """Engine core: put the report next to any KV-connector stats (a copy: never edit theirs)."""
    scheduler_stats.kv_connector_stats = {**(scheduler_stats.kv_connector_stats or {}), REPORT_KEY: report}


def take_report(scheduler_stats) -> dict | None:
    """Front end: remove the report, leaving the field as vLLM made it (None when it held only
    ours: vLLM's logging logger hands any non-empty dict to a KV connector, which may not exist)."""
    stats = getattr(scheduler_stats, "kv_connector_stats", None)
    if not stats or REPORT_KEY not in stats:
        return None
    rest = dict(stats)
    report = rest.pop(REPORT_KEY)
    scheduler_stats.kv_connector_stats = rest or None
    return report


from vllm.v1.metrics.loggers import AggregateStatLoggerBase  # noqa: E402


class DSparkStatLogger(AggregateStatLoggerBase):
    """Front end: DSpark's reports (one per engine step, from every engine) -> `vllm:dspark_*`.

    Installed first among a DSpark engine's stat loggers (`_add_stat_logger`).
    The Prometheus metrics are made once vLLM's Prometheus logger, built after
    this one, has cleared the registry of `vllm:` metrics.
    """

    def __init__(self, vllm_config, engine_indexes: list[int] | None = None):
        options = options_from_additional_config(vllm_config.additional_config)
        self.policy = options.verification
        self.num_positions = vllm_config.speculative_config.num_speculative_tokens
        self.prometheus: DSparkPrometheus | None = None

    def _exporter(self) -> DSparkPrometheus:
        if self.prometheus is None:
            self.prometheus = DSparkPrometheus(self.policy, self.num_positions)
        return self.prometheus

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        report = take_report(scheduler_stats)
        if report is not None:
            self._exporter().record(report)

    def log_engine_initialized(self):
        self._exporter()  # the metrics exist (at zero) from the start


# ---------------------------------------------------------------------------
# The proposer: draft model + its attention layers in vLLM's paged KV cache.
# ---------------------------------------------------------------------------


@dataclass
class DraftRound:
    """The latest drafting round (one row per drafting request), kept until the
    next step verifies it. The drafts' q rows travel on vLLM's own route
    (the runner's `_draft_probs` / `_draft_prob_req_ids`)."""

    req_ids: list[str]
    anchors: list[int]  # [R]
    anchor_positions: np.ndarray  # [R]
    tokens: torch.Tensor  # [R, K] the drafter's (a row in `took_lookup` verifies lookup's instead)
    survival: np.ndarray | None  # [R, K] calibrated a_k (float64)
    confidence_logits: torch.Tensor | None  # [R, K]
    took_lookup: np.ndarray | None = None  # [R] bool: the row took prompt lookup's block (lookup.py)


def round_rows(round_req_ids: list[str] | None, req_ids: list[str]) -> np.ndarray:
    """Row of each request in a round drafted for `round_req_ids` ([n] int64), -1 where
    it has none (e.g. the placeholder drafts vLLM schedules for a resumed request)."""
    if round_req_ids is None:
        return np.full(len(req_ids), -1, dtype=np.int64)
    row_of = {req_id: r for r, req_id in enumerate(round_req_ids)}
    return np.fromiter((row_of.get(req_id, -1) for req_id in req_ids), dtype=np.int64, count=len(req_ids))


@dataclass
class FinishedStep:
    """A step whose cost the guard and the cost model learn once the next one starts
    (`DSparkRunnerMixin._dspark_settle`)."""

    cost: sps_profile.StepCost  # the cost model of the step (its drafting requests)
    num_scheduled_tokens: int
    num_drafting: int  # requests that drafted in it
    draft_s: float  # its drafting round's time
    num_decoding: int  # requests that could draft in it
    other_tokens: int  # scheduled tokens of other requests (prefill chunks)
    emitted: int | None  # tokens it emitted; None where it verified nothing
    measured: float  # seconds in the worker


class DSparkProposer:
    """The `custom_class` drafter. Built by vLLM's runner with the config only."""

    LAYER_PREFIX = "dspark_draft.layers"
    PENDING_CONTEXT_BYTES = 16 << 20

    def __init__(self, vllm_config):
        self.vllm_config = vllm_config
        self.options: DSparkOptions = options_from_additional_config(vllm_config.additional_config)
        target = TargetInfo.from_hf_config(vllm_config.model_config.hf_config)
        # Draft tokens a step may verify per request; prompt lookup's blocks may run past
        # the drafter's, which drafts at most its block_size (num_tokens).
        self.max_draft_tokens = vllm_config.speculative_config.num_speculative_tokens
        self.draft_config = validate_checkpoint(self.options.draft_model, target, self.max_draft_tokens,
                                                self.options.prompt_lookup is not None)
        self.num_tokens = min(self.max_draft_tokens, self.draft_config.block_size)
        self.num_target_layers = target.num_hidden_layers
        self.policy = make_policy(self.options.verification, self.options.model_dump(),
                                  confidence_head=self.draft_config.enable_confidence_head)
        # The calibration map of the confidences (calibration.calibrated_logits): the offline
        # file's, times the online refinement's per-position temperature when refining.
        self.offline_maps = None
        if self.options.calibration:
            self.offline_maps = load_calibration(self.options.calibration, self.draft_config.block_size).maps
        self.maps = self.offline_maps  # in use; None: the raw head
        self._map_t = None  # the map in use on the drafter's device (built once per change)
        self.online = None  # online STS refinement, if asked for
        if self.options.refinement is not None:
            r = self.options.refinement
            self.online = OnlineCalibration(np.ones(self.num_tokens), r.every, r.window, r.max_change, r.bins)
            self.maps = scaled_maps(self.offline_maps, self.online.temperatures, self.num_tokens)
        self.profile = None  # SPSProfile, set by the runner before serving
        self.learned = sps_profile.ServingCorrections()  # what the profile does not see
        self.guard = BreakEvenGuard() if self.options.break_even else None
        # Counters in private memory. Only the first rank reports them: every rank sees the
        # same steps, and it is the rank whose step output vLLM's executor returns.
        self.reports_stats = _is_first_rank()
        self.stats = EngineStats(self.policy.name, self.max_draft_tokens)
        if self.maps is not None:
            self.stats.record_calibration(np.asarray(self.maps["temperatures"][: self.num_tokens]), float("nan"), 0)
        self.model = None
        self.attn_layers: list = []
        self.layer_names: list[str] = []
        self.round: DraftRound | None = None  # the round the next step verifies
        self.rounds_drafted = 0  # drafter forwards while serving
        # The latest rounds, for checks against the dense reference (references only: no per-step work).
        self.recent_rounds: deque[DraftRound] = deque(maxlen=64)
        self.verifying: np.ndarray | None = None  # round_rows of the requests verified this step
        self.step_emitted: int | None = None  # output tokens of this step's verification (None: none ran)
        self.shared: list[str] = []  # draft weights that alias the target's
        # Context of steps that drafted nothing, written with the next round's: at most
        # PENDING_CONTEXT_BYTES (16 MiB) of target features, outside vLLM's KV budget.
        width = len(self.draft_config.target_layer_ids) * self.draft_config.hidden_size
        itemsize = vllm_config.model_config.dtype.itemsize
        self.pending = PendingContext(max_tokens=max(1, self.PENDING_CONTEXT_BYTES // (width * itemsize)))
        self.context_writes = 0  # context K/V writes while serving (for dspark_info)
        # The drafter's dtype (DSparkOptions.draft_dtype, resolved in load_model) and that of
        # what vLLM's attention layers take and its paged cache holds.
        self.dtype = self.cache_dtype = vllm_config.model_config.dtype

    def load_model(self, target_model) -> None:
        from vllm.model_executor.layers.attention import Attention

        cfg = self.draft_config
        device = next(target_model.parameters()).device
        self.dtype = draft_dtype(self.options.draft_dtype, self.cache_dtype, device)
        self.model = load_draft_model(self.options.draft_model, self.dtype, device)
        self.share_with_target(target_model)
        if device.type == "cpu":
            self.use_vllm_cpu_kernels(target_model)
        logger.info("DSpark draft %s loaded in %s: block_size=%d, verifying up to %d tokens, "
                    "policy=%s, break-even guard %s, shared with target: %s", self.options.draft_model,
                    str(self.dtype).removeprefix("torch."), cfg.block_size, self.max_draft_tokens, self.policy.name,
                    "on" if self.guard else "off", self.shared or "nothing")
        cache_config = self.vllm_config.cache_config
        self.layer_names = [
            f"{self.LAYER_PREFIX}.{self.num_target_layers + i}.attn" for i in range(cfg.num_hidden_layers)
        ]
        # Created under vLLM's current config, these register in the static
        # forward context: vLLM then sizes, allocates and binds their paged KV.
        self.attn_layers = torch.nn.ModuleList(
            Attention(cfg.num_attention_heads, cfg.head_dim, cfg.head_dim**-0.5,
                      num_kv_heads=cfg.num_key_value_heads, cache_config=cache_config, prefix=name)
            for name in self.layer_names
        )

    def share_with_target(self, target_model) -> None:
        """Use the target's embedding / LM head storage where the draft's copy is identical.

        DeepSpec saves frozen copies of both in every checkpoint; sharing them
        saves their memory (2 x vocab x hidden) without changing any result.
        """
        pairs = [("embed_tokens", getattr(getattr(target_model, "model", None), "embed_tokens", None)),
                 ("lm_head", getattr(target_model, "lm_head", None))]
        for name, target_module in pairs:
            target_weight = getattr(target_module, "weight", None)
            mine = getattr(self.model, name).weight
            if target_weight is None or target_weight.shape[0] < mine.shape[0]:
                continue
            candidate = target_weight[: mine.shape[0]]
            if candidate.shape == mine.shape and candidate.dtype == mine.dtype and torch.equal(candidate, mine):
                getattr(self.model, name).weight = torch.nn.Parameter(candidate, requires_grad=False)
                self.shared.append(name)

    def use_vllm_cpu_kernels(self, target_model) -> None:
        """Run the draft's linear layers, RMSNorms and rotary embedding through vLLM's
        CPU kernels: packed GEMMs (oneDNN / AMX, about 3x torch's bf16 linear at decode
        sizes, same results), its RMSNorm (5x torch's bf16 rms_norm, same results) and
        its rotary op (q and k in place, 3x). Projections that share an input run as one
        GEMM, as in vLLM's own layers: Q/K/V (the block), K/V (the context writes) and
        gate/up (then torch's silu and mul: vLLM's CPU kernel for it is slower). The
        modules stay the ones training and the dense reference run; only their kernels
        change. A shared LM head uses the target's packed copy instead of packing the
        vocabulary twice."""
        from vllm import _custom_ops as ops
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        from .model.dspark import RMSNorm

        # Kept unpacked: projections that run fused, and the Markov head's W2 (MarkovHead.adder).
        unpacked = {self.model.markov_head.markov_w2} if self.model.markov_head is not None else set()
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            q, k, v = attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features
            attn.project_qkv = _fused_cpu_linear([attn.q_proj, attn.k_proj, attn.v_proj], [q, k, v])
            attn.project_kv = _fused_cpu_linear([attn.k_proj, attn.v_proj], [k, v])
            gate_up = _fused_cpu_linear([mlp.gate_proj, mlp.up_proj])
            mlp.forward = lambda x, f=gate_up, down=mlp.down_proj: down(_silu_and_mul(f(x)))
            unpacked |= {attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj}
        target_head = getattr(target_model, "lm_head", None)
        for name, module in self.model.named_modules():
            if isinstance(module, RMSNorm):
                module.forward = functools.partial(_vllm_rms_norm, ops, module)
            if not isinstance(module, torch.nn.Linear) or module in unpacked:
                continue
            if name == "lm_head" and "lm_head" in self.shared and hasattr(target_head, "cpu_linear"):
                vocab = module.weight.shape[0]
                module.forward = lambda x, head=target_head, V=vocab: head.cpu_linear(x, head.weight, None)[..., :V]
                continue
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            module.forward = lambda x, m=module: m.cpu_linear(x, m.weight, m.bias)
        cfg = self.draft_config
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
        angles = torch.arange(self.vllm_config.model_config.max_model_len, dtype=torch.float32)[:, None] * inv_freq
        cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1).to(self.model.fc.weight.dtype)
        self.model.rotary = lambda positions: _VllmRotary(ops, positions, cos_sin, cfg.head_dim)

    def propose(self, *args, **kwargs):
        raise RuntimeError(
            "DSparkProposer needs the DSpark worker (it feeds the target's hidden states). "
            "worker_cls is normally filled in by the dspark-vllm plugin; if you set "
            "worker_cls yourself, use 'dspark_vllm.vllm_integration.DSparkCPUWorker' "
            "(CPU) or 'dspark_vllm.vllm_integration.DSparkGPUWorker' (CUDA)."
        )

    # -- context: write the draft layers' K/V at the target's slots ----------
    @torch.inference_mode()
    def write_context(self, target_features, positions, slot_mapping) -> None:
        """Write these tokens' draft-context K/V, after those of every deferred step."""
        if self.pending.parts:
            self.pending.add(target_features, positions, slot_mapping)
            target_features, positions, slot_mapping = self.pending.take()
        self.context_writes += 1
        fused = self.model.fuse_target_features(target_features.to(self.model.fc.weight.dtype))
        rotary = self.model.rotary(positions)
        for layer, attn in zip(self.model.layers, self.attn_layers):
            k, v = layer.self_attn.keys_values(fused, rotary)
            k, v = k.to(self.cache_dtype), v.to(self.cache_dtype)  # no-ops unless draft_dtype differs
            attn.impl.do_kv_cache_update(attn, k, v, attn.kv_cache, slot_mapping)

    def defer_context(self, target_features, positions, slot_mapping) -> None:
        """A step in which nobody drafts: stash its context for the next round's write
        (proposer.PendingContext), or write the stash now when it is full."""
        if self.pending.add(target_features, positions.clone(), slot_mapping.clone()):
            self.write_context(*self.pending.take())

    # -- confidence-scheduled verification ---------------------------------
    def calibrated_confidences(self, drafts) -> torch.Tensor | None:
        """c_k = sigmoid(g_k(z_k)) after STS; the raw head output when not calibrated."""
        if drafts.confidence_logits is None:
            return None
        if self.maps is None:
            return drafts.confidences.float()
        logits = drafts.confidence_logits.float()
        if self._map_t is None or self._map_t.temperatures.device != logits.device:
            self._map_t = ConfidenceMap.of(**self.maps, device=logits.device)  # load_calibration checked its size
        return torch.sigmoid(self._map_t(logits))

    def begin_round(self) -> None:
        """Before the drafter runs: temperatures re-fitted on verified rounds apply from
        this round on (never to a round that is already drafted; see refinement.py)."""
        update = None if self.online is None else self.online.take_update()
        if update is not None:
            self.maps, self._map_t = scaled_maps(self.offline_maps, update, self.num_tokens), None
            self.stats.record_calibration(np.asarray(self.maps["temperatures"]), self.online.live_ece,
                                          self.online.refits)

    def step_cost(self, num_drafting: int) -> sps_profile.StepCost | None:
        """The cost model of a step in which `num_drafting` requests draft."""
        if self.profile is None:
            return None
        draft_s = self.learned.draft_scale * self.profile.draft_seconds(num_drafting)
        return sps_profile.StepCost(self.profile, self.learned, draft_s)

    def should_draft(self, num_drafting: int) -> bool:
        """The break-even guard's decision for this step (before any draft exists)."""
        cost = self.step_cost(num_drafting)
        if self.guard is None or cost is None:
            return True
        return self.guard.should_draft(num_drafting, cost)

    def verify_lengths(self, confidences, num_drafting: int, other_tokens: int) -> torch.Tensor:
        """How many drafts of each drafting request go to verification next step ([R] int64, CPU).

        other_tokens: tokens of the same forward pass the policy does not
        schedule (tokens of requests that do not draft, e.g. prefill chunks).
        """
        return self.policy.lengths(confidences, self.num_tokens, num_drafting, other_tokens=other_tokens,
                                   profile=self.step_cost(num_drafting))

    def record_verification(self, req_ids: list[str], num_draft_tokens: list[int], output: torch.Tensor) -> None:
        """Per-position verified / accepted / predicted counts of this step's verification."""
        rows, self.verifying = self.verifying, None
        if rows is None:
            rows = round_rows(self.round and self.round.req_ids, req_ids)
        out = output.cpu().numpy()
        nd = np.asarray(num_draft_tokens)
        accepted = (out != PLACEHOLDER).sum(-1) - 1
        positions = np.arange(self.max_draft_tokens)
        verified_mask = nd[:, None] > positions  # [n, max_draft_tokens]: slot k of request r was verified
        predicted = expected = None  # expected: accepted drafts the guard's probes compare (all rows known)
        if self.round is not None and self.round.survival is not None:
            known, K = rows >= 0, self.num_tokens  # survival exists for the drafter's K slots only
            predicted = np.zeros(len(positions))
            predicted[:K] = (self.round.survival[rows[known]] * verified_mask[known, :K]).sum(0)
            expected = float(predicted.sum()) if known.all() else None
        self.stats.record_verification(verified_mask.sum(0), (accepted[:, None] > positions).sum(0), predicted)
        if self.online is not None and self.round is not None:
            mine = (rows >= 0) & (nd > 0)
            if self.round.took_lookup is not None:  # lookup's accepted counts say nothing of the head
                mine &= ~self.round.took_lookup[rows]
            logits = self.round.confidence_logits.float().cpu().numpy()[rows[mine]]
            if self.offline_maps is not None:  # refinement scales the offline map's logits
                logits = calibrated_logits(logits, **self.offline_maps)
            self.online.observe(logits, nd[mine], accepted[mine])
        num_accepted = int(accepted.sum())
        if self.guard is not None:
            self.guard.observe(int((nd > 0).sum()), int(nd.sum()), num_accepted, expected)
        self.step_emitted = num_accepted + len(nd)  # this step's output tokens, for the guard


def draft_dtype(option: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The drafter's dtype for DSparkOptions.draft_dtype ("auto", "model" or "float32")."""
    if option == "float32" or (option == "auto" and device.type == "cpu" and not _cpu_gemm_is_native(model_dtype)):
        return torch.float32
    return model_dtype


def _cpu_gemm_is_native(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` matrices in hardware. x86 without AVX512-BF16
    or AMX (e.g. AVX2-only parts) has no bf16 / fp16 dot products: torch converts, and
    its bf16 GEMM costs about 6x the float32 one at 8 rows (2.7x at 1 row)."""
    if dtype == torch.float32 or platform.machine().lower() not in ("x86_64", "amd64", "i686"):
        return True  # other architectures: keep the model dtype
    if dtype == torch.bfloat16:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if dtype == torch.float16:
        return torch.cpu._is_amx_fp16_supported()
    return True


def _fused_cpu_linear(linears: list[torch.nn.Linear], split: list[int] | None = None):
    """x -> cat([l(x) for l in linears], -1) as one vLLM packed GEMM (the way vLLM's own
    QKV and gate-up layers run), or its `split` views; the separate layers stay for
    training and the reference."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    fused = torch.nn.Module()
    fused.weight = torch.nn.Parameter(torch.cat([lin.weight for lin in linears]), requires_grad=False)
    has_bias = linears[0].bias is not None
    fused.bias = torch.nn.Parameter(torch.cat([lin.bias for lin in linears]), requires_grad=False) if has_bias else None
    dispatch_cpu_unquantized_gemm(fused, remove_weight=True)  # packed: drops the copy (torch fallback: keeps it)
    if split is None:
        return lambda x: fused.cpu_linear(x, fused.weight, fused.bias)
    return lambda x: fused.cpu_linear(x, fused.weight, fused.bias).split(split, dim=-1)


def _silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of [..., 2I] (MLP.forward's gate and up, fused). Torch's ops, not
    vLLM's silu_and_mul kernel: on the CPU that kernel took 2.4x (1 row) to 4.8x
    (448 rows, a 64-request round) torch's time, bf16 and float32, one thread."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate).mul_(up)


def _vllm_rms_norm(ops, norm, x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    ops.rms_norm(out, x.contiguous(), norm.weight, norm.eps)
    return out


class _VllmRotary:
    """model.dspark.Rotary's interface on vLLM's rotary kernel (NeoX style, in place)."""

    def __init__(self, ops, positions: torch.Tensor, cos_sin: torch.Tensor, head_dim: int):
        self.ops, self.positions, self.cos_sin, self.head_dim = ops, positions.long(), cos_sin, head_dim

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, heads, head_dim], rotated in place (callers pass fresh tensors) and returned."""
        x = x.contiguous()
        self.ops.rotary_embedding(self.positions, x.view(x.shape[0], -1), None, self.head_dim, self.cos_sin, True)
        return x

    def apply_pair(self, q: torch.Tensor, k: torch.Tensor):
        """Queries and keys in one kernel call, in place, without concatenating them."""
        q, k = q.contiguous(), k.contiguous()
        self.ops.rotary_embedding(self.positions, q.view(q.shape[0], -1), k.view(k.shape[0], -1), self.head_dim,
                                  self.cos_sin, True)
        return q, k


def _tp_world_size() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_world_size()
    except (AssertionError, ImportError):
        return 1


def _rng_state(device) -> torch.Tensor:
    """The default generator's state on `device` (drafting's unseeded draws come from it)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _is_first_rank() -> bool:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except (AssertionError, ImportError):  # no distributed state (tests that build the proposer alone)
        return True


def _with_attributes(output, **attributes):
    """`output` with `attributes` set on its ModelRunnerOutput (plain attributes:
    pickling keeps them on every executor's route). vLLM returns one shared empty output
    object, which is copied rather than changed; under async scheduling the
    ModelRunnerOutput is wrapped."""
    from copy import copy

    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

    inner = getattr(output, "_model_runner_output", output)
    if not isinstance(inner, ModelRunnerOutput):
        return output  # e.g. intermediate tensors: not a step's result
    if inner is EMPTY_MODEL_RUNNER_OUTPUT:
        inner = copy(inner)
        if output is EMPTY_MODEL_RUNNER_OUTPUT:
            output = inner
        else:
            output._model_runner_output = inner
    for name, value in attributes.items():
        setattr(inner, name, value)
    return output


def _host_to_device(array, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host array (numpy or list) as a tensor on `device`, without a host sync.

    A plain `.to("cuda")` of pageable memory waits until the GPU has finished
    all queued work; staged through pinned memory and queued non_blocking, the
    copy runs in stream order and the host goes on launching kernels. (torch's
    pinned allocator keeps the staging buffer until the copy is done.)
    """
    from vllm.utils.platform_utils import is_pin_memory_available

    t = torch.as_tensor(np.asarray(array))
    if dtype is not None:
        t = t.to(dtype)
    if device.type != "cuda" or not is_pin_memory_available():  # e.g. WSL without pinned memory
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _metadata_device(sampling_metadata) -> torch.device:
    """The device vLLM keeps this batch's sampling tensors on."""
    for name in ("temperature", "top_p", "top_k", "frequency_penalties"):
        t = getattr(sampling_metadata, name, None)
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------
# The model runner: hidden states in, variable-length drafts out.
# ---------------------------------------------------------------------------


def sampling_rows(sampling_metadata, num_reqs: int, vocab_size: int) -> SamplingRows:
    """Per-request temperature / top-k / top-p / min-p / logit bias from vLLM's metadata.

    Min-p and logit bias come from vLLM's own processors, which vLLM 0.32 drops
    whenever speculative decoding is configured and `_dspark_setup` puts back.
    The rows stay on the device vLLM keeps them on (no `.cpu()`): drafting and
    verification use them there, and on CUDA each copy to the host would stall
    the host until the GPU is idle.
    """
    from vllm.v1.sample.logits_processor import LogitBiasLogitsProcessor, MinPLogitsProcessor

    procs = {type(p): p for p in sampling_metadata.logitsprocs.all}
    bias = None
    logit_bias = procs.get(LogitBiasLogitsProcessor)
    if logit_bias is not None and logit_bias.biases:  # sparse (request, token, bias) -> dense rows
        req, tok = logit_bias.logits_slice
        bias = torch.zeros(num_reqs, vocab_size, device=logit_bias.bias_tensor.device)
        bias.index_put_((req.long(), tok.long()), logit_bias.bias_tensor, accumulate=True)
    device = _metadata_device(sampling_metadata)
    if sampling_metadata.all_greedy:
        return SamplingRows(torch.zeros(num_reqs, device=device), bias=bias)
    temp = sampling_metadata.temperature
    temp = torch.zeros(num_reqs, device=device) if temp is None else temp[:num_reqs].float()
    top_k = None if sampling_metadata.top_k is None else sampling_metadata.top_k[:num_reqs]
    top_p = None if sampling_metadata.top_p is None else sampling_metadata.top_p[:num_reqs].float()
    min_p = procs.get(MinPLogitsProcessor)
    min_p = min_p.min_p[:num_reqs, 0] if min_p is not None and min_p.min_p_count else None
    return SamplingRows(temp, top_k, top_p, min_p, bias)


def other_token_count(scheduler_output, decoding: list[str]) -> int:
    """Scheduled tokens of a step other than the decode tokens (1 + the drafts they
    verify) of the `decoding` requests, which sampled in this step (so each is
    scheduled): prefill chunks, including the prompt of a request whose prefill ends
    in this step (it samples, so it is decoding, but its prompt is no decode token).
    Without drafts in the step (the guard skipped the last round) nothing is summed."""
    spec = scheduler_output.scheduled_spec_decode_tokens
    verified = sum(len(spec[r]) for r in decoding if r in spec) if spec else 0
    return scheduler_output.total_num_scheduled_tokens - len(decoding) - verified


class DSparkRunnerMixin:
    """Overrides on vLLM's V1 GPUModelRunner / CPUModelRunner."""

    def _dspark_setup(self) -> None:
        self.use_aux_hidden_state_outputs = True
        self.rejection_sampler = DSparkRejectionSampler(
            self.sampler, self.speculative_config, self.device, self.drafter, self)
        self._dspark_step_start = None
        self._dspark_step_end = None
        self._dspark_unsettled: FinishedStep | None = None  # the last step, until the next one starts
        self._dspark_attn = None  # (kv cache group, metadata builder) of the draft layers
        self.speculative_steps = 0  # steps that took vLLM's speculative path (for dspark_info)
        self._dspark_lookup = None  # prompt lookup: (vLLM's n-gram search, proposals, lengths) per batch row
        self._dspark_lookup_thread = None  # the thread whose numba thread count is set to 1
        self._dspark_restore_logits_processors()

    def _prepare_inputs(self, scheduler_output, *args, **kwargs):
        """A step that verifies no draft (the guard skipped the drafter, a prefill) takes
        vLLM's plain path: logits of one row per request and vLLM's sampler, exactly what
        plain decoding runs. vLLM 0.32 takes its speculative path whenever a speculative
        config exists, drafts or not: speculative metadata, the rejection sampler's
        wrapper and its bookkeeping cost a 64-request step about 0.3 ms here (of 15-18
        ms). Models with recurrent layers keep vLLM's path (vLLM's zero-draft rows set
        a state offset their kernels read)."""
        if scheduler_output.scheduled_spec_decode_tokens or not self._dspark_attention_only:
            self.speculative_steps += 1
            return super()._prepare_inputs(scheduler_output, *args, **kwargs)
        spec, self.speculative_config = self.speculative_config, None  # read once, to pick the path
        try:
            return super()._prepare_inputs(scheduler_output, *args, **kwargs)
        finally:
            self.speculative_config = spec

    @functools.cached_property
    def _dspark_attention_only(self) -> bool:
        """Whether every KV cache group is attention (draft-less steps may take vLLM's plain path)."""
        from vllm.v1.kv_cache_interface import AttentionSpec

        return all(isinstance(g.kv_cache_spec, AttentionSpec) for g in self.kv_cache_config.kv_cache_groups)

    def _dspark_restore_logits_processors(self) -> None:
        """Put back vLLM's min-p and logit-bias processors, which vLLM drops under
        speculative decoding: this verification applies both exactly (to drafts,
        target rows and the bonus row), and vLLM's processors keep each request's
        values in step with the batch."""
        from vllm.v1.sample.logits_processor import (LogitBiasLogitsProcessor, LogitsProcessors,
                                                     MinPLogitsProcessor)
        from vllm.v1.worker.gpu_input_batch import PIN_MEMORY

        procs = list(self.input_batch.logitsprocs.all)
        missing = [cls for cls in (LogitBiasLogitsProcessor, MinPLogitsProcessor)
                   if not any(isinstance(p, cls) for p in procs)]
        procs += [cls(self.vllm_config, self.device, PIN_MEMORY) for cls in missing]
        self.input_batch.logitsprocs = LogitsProcessors(procs)

    def _get_eagle3_aux_layers_from_config(self):
        # vLLM records aux state j = input of layer j = output of layer j-1.
        return tuple(i + 1 for i in self.drafter.draft_config.target_layer_ids)

    def _input_fits_in_drafter(self, *args, **kwargs) -> bool:
        return True  # decided per request in propose_draft_token_ids

    def _dspark_group(self):
        if self._dspark_attn is None:
            name = self.drafter.layer_names[0]
            for gid, group in enumerate(self.kv_cache_config.kv_cache_groups):
                if name in group.layer_names:
                    for attn_group in self.attn_groups[gid]:
                        if name in attn_group.layer_names:
                            self._dspark_attn = gid, attn_group.get_metadata_builder()
            if self._dspark_attn is None:
                raise RuntimeError(f"draft attention layer {name} has no KV cache group")
        return self._dspark_attn

    def _get_spec_decode_draft_probs(self, metadata):
        """vLLM's lookup of the drafts' q rows by request, without a Python loop over
        requests, and with zero rows (= a deterministic draft) where a request has none."""
        drafter: DSparkProposer = self.drafter
        req_ids = self.input_batch.req_ids[: len(metadata.num_draft_tokens)]
        round_ids = drafter.round and drafter.round.req_ids
        rows = drafter.verifying = round_rows(round_ids, req_ids)
        if self._draft_probs is None:
            return None
        if self._draft_prob_req_ids is not round_ids:  # a follower rank holds the driver's q rows
            rows = round_rows(self._draft_prob_req_ids, req_ids)
        # flat index (row * K + slot) of every scheduled draft, -1 for requests without a row
        # and past the drafter's K slots (greedy rows verifying prompt lookup's longer block)
        nd, K = np.asarray(metadata.num_draft_tokens), drafter.num_tokens
        slot = np.arange(nd.sum()) - np.repeat(np.cumsum(nd) - nd, nd)
        row = np.repeat(rows, nd)
        index = _host_to_device(np.where((row >= 0) & (slot < K), row * K + slot, -1), self._draft_probs.device)
        q = self._draft_probs.flatten(0, 1)[index.clamp(min=0)]
        return q * (index >= 0)[:, None]

    def _dspark_anchors(self, num_reqs: int, table):
        """Requests that draft this step: a fresh anchor (not mid-prefill) and room for a block.
        Read from the batch's arrays after vLLM's bookkeeping wrote this step's tokens (no
        Python loop over requests): a request whose sampled token vLLM discards (a prefill
        chunk that does not end its prompt) has none."""
        gamma = self.drafter.draft_config.block_size
        last_anchor = np.minimum(table.num_blocks_per_row[:num_reqs] * table.block_size,
                                 self.max_model_len) - gamma  # the block must fit behind the anchor
        positions = self.input_batch.num_tokens_no_spec[:num_reqs] - 1
        fresh = ~self.discard_request_mask.np[:num_reqs]
        rows = np.flatnonzero(fresh & (positions <= last_anchor))
        anchors = self.input_batch.token_ids_cpu[rows, positions[rows]]
        return rows.tolist(), anchors.tolist(), positions[rows]

    @torch.inference_mode()
    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, sampling_metadata, *args):
        """Tensor-parallel ranks agree by construction: only the driver (TP rank 0) drafts.

        vLLM schedules the driver's drafts on every rank, and greedy verification
        reads only the target's (all-gathered, identical) logits, so the other ranks
        need nothing more for greedy batches. Sampled verification also needs the
        drafts' q rows and random draws identical to the driver's: the driver
        broadcasts its q rows and the random-number state its drafting left behind
        (`_dspark_share_round`), so that every rank accepts the same tokens. A rank
        whose own drafter would have drafted differently (a near-tie) cannot diverge.
        """
        if _is_first_rank():
            # sampled_token_ids: vLLM's lists; _dspark_anchors reads the same tokens from the batch's arrays
            drafts = self._dspark_propose(scheduler_output, sampling_metadata, *args)
        else:
            drafts = [[] for _ in range(self.input_batch.num_reqs)]  # never scheduled: only the driver's count
        if _tp_world_size() > 1 and not sampling_metadata.all_greedy:
            self._dspark_share_round(sampling_metadata)
        return drafts

    def _dspark_share_round(self, sampling_metadata) -> None:
        """Driver -> other TP ranks: the round's q rows and the RNG states after drafting."""
        from vllm.distributed import get_tp_group

        generators = sampling_metadata.generators
        if _is_first_rank():
            shared = {"req_ids": self._draft_prob_req_ids, "probs": self._draft_probs,
                      "rng": _rng_state(self.device),
                      **{f"generator.{i}": g.get_state() for i, g in generators.items()}}
            get_tp_group().broadcast_tensor_dict(shared, src=0)
            return
        shared = get_tp_group().broadcast_tensor_dict(src=0)
        self._draft_probs, self._draft_prob_req_ids = shared["probs"], shared["req_ids"]
        _set_rng_state(self.device, shared["rng"])
        for i, g in generators.items():  # the same batch, so the same seeded requests
            g.set_state(shared[f"generator.{i}"])

    def _dspark_propose(self, scheduler_output, sampling_metadata,
                        hidden_states, sample_hidden_states, aux_hidden_states,
                        spec_decode_metadata, common_attn_metadata, slot_mappings):
        drafter: DSparkProposer = self.drafter
        n = scheduler_output.total_num_scheduled_tokens
        # 1. Who can draft, and does drafting pay this step (break-even guard)?
        num_reqs = self.input_batch.num_reqs
        req_ids = self.input_batch.req_ids[:num_reqs]
        gid, _ = self._dspark_group()
        table = self.input_batch.block_table[gid]
        rows, anchors, anchor_pos = self._dspark_anchors(num_reqs, table)
        round_ids = [req_ids[i] for i in rows]
        other_tokens = other_token_count(scheduler_output, round_ids)
        drafts: list[list[int]] = [[] for _ in range(num_reqs)]
        drafter.round = None
        drafting = bool(rows) and drafter.should_draft(len(rows))

        # 2. Every scheduled token becomes draft context (prefill chunks too), drafting or
        #    not; a step that does not draft defers the write to the next one that does.
        features = torch.cat([h[:n] for h in aux_hidden_states], dim=-1)
        if isinstance(slot_mappings, list):
            slot_mappings = slot_mappings[0]
        slots = slot_mappings[drafter.layer_names[0]][:n]
        if not drafting:
            drafter.defer_context(features, self.positions[:n], slots)
            self._dspark_end_step(n, 0, 0, 0.0, len(rows), other_tokens)
            return drafts
        drafter.write_context(features, self.positions[:n], slots)

        # 3. One parallel block forward on the paged KV cache + the Markov loop,
        #    then the policy's verification lengths.
        started = time.perf_counter()
        drafter.begin_round()
        drafter.rounds_drafted += 1
        device = features.device
        block_table = table.get_device_tensor(num_reqs)
        sampling = sampling_rows(sampling_metadata, num_reqs, drafter.draft_config.vocab_size)
        generators = {j: sampling_metadata.generators[i] for j, i in enumerate(rows)
                      if i in sampling_metadata.generators}
        if len(rows) < num_reqs:  # else rows == 0..num_reqs-1: nothing to pick
            rows_t = _host_to_device(rows, device, torch.long)
            sampling, block_table = sampling.index(rows_t), block_table[rows_t]
        out = self._dspark_draft(block_table, table.block_size, _host_to_device(anchors, device, torch.long),
                                 anchor_pos, sampling, generators, sampled=not sampling_metadata.all_greedy)
        # The round's one device-to-host copy: draft tokens for the scheduler and the
        # calibrated confidences for the policy (which runs on the host). On the CPU
        # there is nothing to copy, and packing the two into one tensor would cost ops.
        confidences = drafter.calibrated_confidences(out)
        K = out.tokens.shape[1]
        if confidences is None or device.type == "cpu":
            tokens_h, confidences_h = out.tokens.cpu(), None if confidences is None else confidences.double()
        else:
            host = torch.cat([out.tokens.double(), confidences.double()], dim=1).cpu()
            tokens_h, confidences_h = host[:, :K].long(), host[:, K:]
        lengths = drafter.verify_lengths(confidences_h, len(rows), other_tokens)
        choice = None
        if drafter.options.prompt_lookup is not None:
            choice = self._dspark_prompt_lookup(rows, tokens_h.numpy(), confidences_h, sampling,
                                                sampling_metadata.all_greedy)
        if choice is not None:
            tokens_h = torch.from_numpy(choice.tokens)
            lengths = torch.from_numpy(choice.verify_lengths(lengths.numpy(), K))
            drafter.stats.record_lookup(int(choice.took.sum()))

        # 4. Hand over: token lists to the scheduler, q rows on vLLM's draft-probs route.
        tokens = tokens_h.tolist()
        for j, (i, L) in enumerate(zip(rows, lengths.tolist())):
            drafts[i] = tokens[j][:L]
        survival = None if confidences_h is None else confidences_h.numpy().cumprod(-1)
        drafter.round = DraftRound(round_ids, anchors, anchor_pos, out.tokens, survival, out.confidence_logits,
                                   None if choice is None else choice.took)
        drafter.recent_rounds.append(drafter.round)
        if out.probs is not None:
            self._draft_probs, self._draft_prob_req_ids = out.probs, round_ids
        self._dspark_end_step(n, len(rows), int(lengths.sum()), time.perf_counter() - started, len(rows), other_tokens)
        return drafts

    def _dspark_prompt_lookup(self, rows: list[int], drafts: np.ndarray, confidences: torch.Tensor | None,
                              sampling, all_greedy: bool) -> LookupChoice | None:
        """Prompt lookup on the drafting requests' committed tokens (vLLM's n-gram search,
        batched, on the host arrays vLLM keeps anyway), and the choice per request between
        its block and the drafter's (lookup.py). None: no n-gram matched, the drafter's
        blocks stand."""
        options, batch = self.drafter.options.prompt_lookup, self.input_batch
        W = self.drafter.max_draft_tokens  # lookup's blocks may run past the drafter's K
        if self._dspark_lookup is None:
            # Imported here, after the worker's init: numba in sys.modules while vLLM's CPU
            # worker rebinds its Triton kernels (a scan of every module) breaks that scan.
            from vllm.v1.spec_decode.ngram_proposer import batch_propose_numba

            n = batch.token_ids_cpu.shape[0]
            self._dspark_lookup = batch_propose_numba, np.zeros((n, W), np.int32), np.zeros(n, np.int32)
        if self._dspark_lookup_thread != threading.get_ident():
            # numba's thread count is per thread. One thread: a search costs a few microseconds
            # a request, and a parallel region would wake threads that torch's kernels use.
            import numba

            numba.set_num_threads(1)
            self._dspark_lookup_thread = threading.get_ident()
        search, found, lengths = self._dspark_lookup
        rows = np.asarray(rows)  # numba unboxes an array much faster than a list
        search(rows, batch.num_tokens_no_spec, batch.token_ids_cpu, options.min_n, options.max_n,
               self.max_model_len, W, found, lengths)
        lengths = lengths[rows]
        if not lengths.any():
            return None
        eligible = np.ones(len(rows), dtype=bool) if all_greedy else sampling.is_greedy.cpu().numpy()
        if confidences is not None:  # one layout for numba (a CUDA round's host copy is a slice)
            confidences = np.ascontiguousarray(confidences.numpy())
        return choose(drafts, found[rows], lengths, eligible, confidences, options.max_confidence)

    def _dspark_warm_up_lookup(self) -> None:
        """numba compiles the n-gram search and the choice now (about 2 s), not in a served
        step: a search on an empty row, then the choice on arrays of the types a step passes
        (the search's own buffers, int64 drafts, float64 confidences)."""
        K = self.drafter.num_tokens
        self._dspark_prompt_lookup([0], np.zeros((1, K), np.int64), None, None, True)  # no match: no choice
        _, found, lengths = self._dspark_lookup
        choose(np.zeros((1, K), np.int64), found[:1], lengths[:1], np.ones(1, bool), np.zeros((1, K)), 1.0)

    def _dspark_draft(self, block_table, block_size: int, anchors, anchor_pos: np.ndarray, sampling, generators,
                      sampled: bool | None = None):
        """One drafting round for len(anchors) requests whose context K/V sit in the paged cache."""
        drafter: DSparkProposer = self.drafter
        _, builder = self._dspark_group()
        anchor_pos_t = _host_to_device(anchor_pos, anchors.device, torch.long)
        attend = self._paged_block_attention(builder, block_table, block_size, anchor_pos_t,
                                             int(anchor_pos.max()), drafter.draft_config.block_size)
        return draft_block(drafter.model, anchors, anchor_pos_t, attend, drafter.num_tokens, sampling, generators,
                           sampled=sampled)

    # -- step timing and metrics ------------------------------------------
    def execute_model(self, *args, **kwargs):
        start = self._dspark_step_start = time.perf_counter()
        prev_end = self._dspark_step_end
        if prev_end is not None and start - prev_end > IDLE_S:
            reset = getattr(self.drafter.policy, "reset", None)
            if reset is not None:  # async: confidences from before an idle spell describe another batch
                reset()
        if self._dspark_unsettled is not None:
            # Time between steps spent outside the worker (the scheduler's update and, in one
            # process, the front end's output handling) belongs to the step whose output it
            # handles; an idle engine's pause is no step cost.
            gap = start - prev_end if prev_end is not None and start - prev_end < 0.05 else 0.0
            self._dspark_settle(self._dspark_unsettled, gap)
            self._dspark_unsettled = None
        return super().execute_model(*args, **kwargs)

    def sample_tokens(self, *args, **kwargs):
        """vLLM's step output, carrying (from the driver rank, the one whose output vLLM's
        executor returns) a copy of the DSpark counters for the engine core's scheduler,
        and the next round's drafts (see _skip_draft_rpc)."""
        output = super().sample_tokens(*args, **kwargs)
        drafter: DSparkProposer = self.drafter
        extra = {}
        if drafter.reports_stats:
            extra["dspark_stats"] = drafter.stats.snapshot()
        if not self.use_async_scheduling and self.parallel_config.pipeline_parallel_size == 1:
            drafts = self.take_draft_token_ids()
            if drafts is not None:
                extra["dspark_draft_token_ids"] = drafts
        return _with_attributes(output, **extra) if extra else output

    def _dspark_end_step(self, num_scheduled_tokens: int, num_drafting: int, budget: int,
                         draft_s: float, num_decoding: int = 0, other_tokens: int = 0) -> None:
        """Account for every step: measured vs predicted time and metrics now; the cost-model
        corrections and the guard's measured rates once the next step starts (`_dspark_settle`,
        which adds the time until then). num_decoding: requests that could draft this step;
        other_tokens: scheduled tokens of other requests (prefill chunks)."""
        drafter: DSparkProposer = self.drafter
        now, start = time.perf_counter(), self._dspark_step_start
        measured = predicted = None
        if start is not None:
            measured = now - start
            cost = drafter.step_cost(num_drafting)
            if cost is not None:
                predicted = cost.seconds(num_scheduled_tokens)
                self._dspark_unsettled = FinishedStep(cost, num_scheduled_tokens, num_drafting, draft_s,
                                                      num_decoding, other_tokens, drafter.step_emitted, measured)
        drafter.stats.record_step(num_drafting, drafter.num_tokens, budget, measured, predicted)
        drafter.step_emitted = None
        self._dspark_step_start, self._dspark_step_end = None, now

    def _dspark_settle(self, step: FinishedStep, gap: float) -> None:
        """A finished step's cost, measured in the worker plus the `gap` after it, teaches
        the cost model its overhead and the guard the step's rate. (Charging each step the
        gap before it instead made the first plain step after a drafting one pay for that
        step's four-times-larger output: 21 ms against 13-15 ms at 64 requests.)"""
        drafter: DSparkProposer = self.drafter
        seconds = step.measured + gap
        tokens = step.num_scheduled_tokens
        drafter.learned.observe(tokens, 1.0 / drafter.profile.sps(tokens), seconds - step.draft_s, step.draft_s,
                                drafter.profile.draft_seconds(step.num_drafting))
        if drafter.guard is not None:
            other_s = step.cost.extra_seconds(tokens - step.other_tokens, step.other_tokens)
            emitted = step.num_decoding if step.emitted is None else step.emitted
            drafter.guard.observe_step(step.num_decoding, step.emitted is not None, step.num_drafting > 0,
                                       emitted, seconds, other_s)

    # -- engine cost profile SPS(B) ----------------------------------------
    def dspark_load_or_measure_profile(self) -> None:
        """Give the drafter its cost profile: a configs/ file, the disk cache, or a fresh measurement."""
        drafter: DSparkProposer = self.drafter
        opts = drafter.options
        if opts.sps_profile:
            profile, source = sps_profile.load_profile(opts.sps_profile), opts.sps_profile
        elif drafter.policy.name not in ("sync", "async"):
            return  # fixed / threshold never look at the cost curve
        else:
            max_tokens = self.scheduler_config.max_num_batched_tokens
            settings = {"max_num_batched_tokens": max_tokens, "max_num_seqs": self.scheduler_config.max_num_seqs,
                        "dtype": str(self.model_config.dtype), "draft_dtype": str(drafter.dtype),
                        "block_size": drafter.draft_config.block_size,
                        "draft": opts.draft_model, "enforce_eager": self.model_config.enforce_eager,
                        "threads": torch.get_num_threads(), "vllm": _vllm_version()}
            cache_dir = opts.sps_cache_dir or os.path.expanduser("~/.cache/dspark_vllm/sps")
            path = sps_profile.cache_path(cache_dir, self.model_config.model, _hardware_name(self.device),
                                          settings)
            measure = not path.exists()
            if _tp_world_size() > 1:
                # Timing the target runs collective forwards: the driver decides for all ranks.
                from vllm.distributed import get_tp_group

                measure = get_tp_group().broadcast_object(measure, src=0)
            if not _is_first_rank():  # only the driver drafts, so only it needs the profile
                if measure:
                    self._dspark_time_target(max_tokens)
                return
            if not measure:
                profile, source = sps_profile.load_profile(path), f"cache {path}"
            else:
                profile = self._dspark_measure_profile(max_tokens, settings)
                profile.save(path)
                source = f"measured, cached at {path}"
        drafter.profile = profile
        logger.info("DSpark engine cost profile (%s): %s", source, profile.summary())

    def _dspark_time_target(self, max_tokens: int) -> dict[int, float]:
        """Seconds of vLLM's own dummy target forward per batch size B (same kernels and
        padding as serving, without attention over a long context). Every TP rank runs it."""
        points = {}
        for B in sps_profile.measure_sizes(max_tokens):
            self._dummy_run(B)
            points[B] = _best_time(lambda: self._dummy_run(B))
        return points

    def _dspark_measure_profile(self, max_tokens: int, settings: dict):
        """Time the target forward per batch size B and a drafting round per request count R.

        The drafter runs the serving path itself (`_dspark_draft` on the paged
        cache, over blocks that no request owns yet: this runs before the engine serves).
        """
        points = self._dspark_time_target(max_tokens)
        drafts = {}
        for R in sps_profile.measure_sizes(self.scheduler_config.max_num_seqs, dense_upto=4, growth=2.0):
            self._dspark_dummy_draft(R)
            drafts[R] = _best_time(lambda: self._dspark_dummy_draft(R))
        # Noise in the curve stops Algorithm 1's early stop at the wrong place.
        points = {B: 1.0 / t for B, t in sps_profile.monotone_times(points).items()}
        drafts = sps_profile.monotone_times(drafts)
        # Eager engines (the CPU) do not pad batches to buckets: interpolate between sizes.
        shape = "linear" if self.device.type == "cpu" or self.model_config.enforce_eager else "step"
        return sps_profile.make_profile(points, self.model_config.model, _hardware_name(self.device),
                                        settings, shape=shape, draft_points=drafts)

    @torch.inference_mode()
    def _dspark_dummy_draft(self, num_reqs: int, context: int = 16) -> None:
        """A drafting round plus its policy for num_reqs requests over a short context."""
        drafter: DSparkProposer = self.drafter
        gid, _ = self._dspark_group()
        block_size = self.input_batch.block_table[gid].block_size
        per_req = -(-(context + drafter.draft_config.block_size) // block_size)
        num_blocks = self.kv_cache_config.num_blocks
        blocks = torch.arange(num_reqs * per_req) % max(1, num_blocks - 1) + 1  # block 0 is vLLM's null block
        table = blocks.view(num_reqs, per_req).to(device=self.device, dtype=torch.int32)
        anchors = torch.zeros(num_reqs, dtype=torch.long, device=self.device)
        out = self._dspark_draft(table, block_size, anchors, np.full(num_reqs, context),
                                 SamplingRows(torch.zeros(num_reqs)), {})
        if drafter.policy.name in ("sync", "async") and drafter.profile is not None:
            drafter.verify_lengths(drafter.calibrated_confidences(out), num_reqs, 0)

    def _paged_block_attention(self, builder, block_table, block_size, anchor_pos, max_anchor_pos: int, gamma):
        """attend() for draft blocks whose context K/V sit in vLLM's paged cache.

        Block slot k of request r is at position anchor_pos[r] + k; its K/V go
        into the look-ahead slots reserved by DSparkScheduler, and its query
        attends (non-causally) to all positions < anchor_pos[r] + gamma.
        Everything is built on the device from anchor_pos (no host copy).
        """
        from vllm.v1.attention.backend import CommonAttentionMetadata

        B, device = anchor_pos.shape[0], anchor_pos.device
        pos = anchor_pos[:, None] + torch.arange(gamma, device=device)
        blocks = block_table.gather(1, (pos // block_size).long())
        slots = (blocks.long() * block_size + pos % block_size).flatten()
        qsl_cpu = torch.arange(0, (B + 1) * gamma, gamma, dtype=torch.int32)
        qsl = torch.arange(0, (B + 1) * gamma, gamma, dtype=torch.int32, device=device)  # made there: no copy
        seq_lens = (anchor_pos + gamma).to(torch.int32)
        common = CommonAttentionMetadata(
            query_start_loc=qsl, query_start_loc_cpu=qsl_cpu, seq_lens=seq_lens,
            num_reqs=B, num_actual_tokens=B * gamma, max_query_len=gamma, max_seq_len=max_anchor_pos + gamma,
            block_table_tensor=block_table, slot_mapping=slots, causal=False, positions=pos.flatten(),
        )
        # fast_build: metadata used by a few layers once (vLLM's drafters do the same); on
        # CUDA it also skips FlashAttention's ahead-of-time schedule and its persistent buffer.
        meta = builder.build(common_prefix_len=0, common_attn_metadata=common, fast_build=True)
        layers = self.drafter.attn_layers
        dtype, cache_dtype = self.drafter.dtype, self.drafter.cache_dtype

        def attend(i, q, k, v):
            """What vLLM's Attention.forward does for a layer (write the block's K/V, then the
            backend's attention over the paged cache), called on the layer's backend directly:
            vLLM's route through its custom ops looks the metadata, layer and slots up in a
            forward context, which cost a drafting round about as much as the attention itself
            at one request (vLLM's own drafters run inside the target's forward context)."""
            layer = layers[i]
            q, k, v = (x.to(cache_dtype) for x in (q, k, v))  # [T, heads, hd]; no-ops unless draft_dtype differs
            out = q.new_empty(q.shape[0], layer.num_heads, layer.head_size_v)
            layer.impl.do_kv_cache_update(layer, k, v, layer.kv_cache, slots)
            layer.impl.forward(layer, q, k, v, layer.kv_cache, meta, output=out)
            return out.view(q.shape[0], -1).to(dtype)

        return attend


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


def _hardware_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu:{platform.processor() or platform.machine()}:{torch.get_num_threads()}threads"


def _best_time(fn, repeats: int = 5) -> float:
    """Fastest of a few runs: the cost of the step itself, without scheduling noise."""
    # CUDA kernels run asynchronously: time them to completion, not their launch.
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


# ---------------------------------------------------------------------------
# Verification: exact speculative sampling in place of vLLM's rejection sampler.
# ---------------------------------------------------------------------------

from vllm.v1.outputs import SamplerOutput  # noqa: E402
from vllm.v1.sample.rejection_sampler import RejectionSampler  # noqa: E402


def _argmax_decides(sampling_metadata) -> bool:
    """Whether plain decoding would pick every token of this batch as the argmax of the
    target's raw logits: all requests greedy, and nothing that moves or reports on the
    argmax (penalties, bad words, allowed-token masks, logit bias, min-tokens, any other
    logits processor, logprobs). Then greedy verification is `verify_greedy`, exactly."""
    from vllm.v1.sample.logits_processor import LogitBiasLogitsProcessor, MinTokensLogitsProcessor

    m = sampling_metadata
    if (not m.all_greedy or not m.no_penalties or m.allowed_token_ids_mask is not None or m.bad_words_token_ids
            or m.max_num_logprobs is not None or getattr(m, "logprob_token_ids", None)):
        return False
    for p in m.logitsprocs.non_argmax_invariant:
        idle = ((isinstance(p, LogitBiasLogitsProcessor) and not p.biases)
                or (isinstance(p, MinTokensLogitsProcessor) and not p.min_toks))
        if not idle:
            return False
    return True


class DSparkRejectionSampler(RejectionSampler):
    """Exact verification with per-request lengths and full draft probabilities.

    All-greedy batches whose tokens the raw argmax decides (no penalties, bias,
    masks or logprobs) go to `verification.verify_greedy`; other all-greedy
    batches to vLLM's own rejection sampler (its greedy kernel accepts a draft
    iff it is the target's argmax after vLLM's logits processors).
    Otherwise draft rows get vLLM's logits processors (penalties with the
    draft prefix, bad words, allowed tokens, min-tokens), then temperature,
    top-k and top-p exactly in the order of vLLM's sampler, and
    `verification.verify` compares them with the drafts' full q rows (the
    `draft_probs` the runner passes). The bonus token is sampled by vLLM's own
    sampler, as in plain decoding, independently of acceptance.
    """

    def __init__(self, sampler, spec_config, device, proposer: DSparkProposer, runner):
        super().__init__(sampler, spec_config, device)
        self.proposer, self.runner = proposer, runner

    def forward(self, metadata, draft_probs, logits, sampling_metadata):
        if metadata.max_spec_len == 0:
            # No request verifies a draft (the guard skipped the drafter, or prefill):
            # one row per request, sampled exactly as plain decoding samples it.
            return self.sampler(logits=logits, sampling_metadata=sampling_metadata)
        if _argmax_decides(sampling_metadata):
            # The common case: one max over the rows (vLLM's path below copies the target
            # rows to float32 twice and runs its kernel emulation: 1.46 ms of a 64-request
            # step here, against 0.8 ms).
            counts = metadata.num_draft_tokens  # host list
            if min(counts) == max(counts):  # one request, or `fixed`: every request verifies L drafts
                out = verify_greedy_uniform(logits, metadata.draft_token_ids, counts[0])
            else:
                nd = torch.diff(metadata.cu_num_draft_tokens, prepend=metadata.cu_num_draft_tokens.new_zeros(1))
                out = verify_greedy(logits, metadata.draft_token_ids, nd, metadata.max_spec_len)
            result = SamplerOutput(sampled_token_ids=out.to(torch.int32), logprobs_tensors=None)
        elif sampling_metadata.all_greedy:
            # vLLM's greedy verification ignores logit bias on target rows (its sampler
            # adds it to the bonus row): add it first, as plain decoding would.
            rows = sampling_rows(sampling_metadata, len(metadata.num_draft_tokens), logits.shape[-1])
            if rows.bias is not None:
                index = metadata.target_logits_indices
                logits[index] = rows.expand(torch.tensor(metadata.num_draft_tokens)).add_bias(logits[index])
            result = super().forward(metadata, None, logits, sampling_metadata)
        else:
            result = self._sampled(metadata, draft_probs, logits, sampling_metadata)
        if self.runner.input_batch.num_reqs:  # vLLM's dummy sampler runs (warm-up, memory profile) have none
            req_ids = self.runner.input_batch.req_ids[: len(metadata.num_draft_tokens)]
            self.proposer.record_verification(req_ids, metadata.num_draft_tokens, result.sampled_token_ids)
        return result

    def _sampled(self, metadata, draft_probs, logits, sampling_metadata):
        num_reqs = len(metadata.num_draft_tokens)
        bonus_out = self.sampler(
            logits=logits[metadata.bonus_logits_indices],
            sampling_metadata=replace(sampling_metadata, max_num_logprobs=-1),
            predict_bonus_token=True,
            logprobs_mode_override="processed_logits" if self.is_processed_logprobs_mode else "raw_logits",
        )
        bonus = bonus_out.sampled_token_ids.view(-1).long()

        raw_target = logits[metadata.target_logits_indices].float()
        rows = sampling_rows(sampling_metadata, num_reqs, logits.shape[-1])
        # request of each draft token, queued to the device (no host sync)
        request_of_token = np.repeat(np.arange(num_reqs), metadata.num_draft_tokens)
        token_rows = rows.index(_host_to_device(request_of_token, raw_target.device))
        # vLLM's order: logit bias, then penalties / bad words / allowed tokens / min-tokens,
        # then temperature, min-p, top-k, top-p.
        target = self.apply_logits_processors(token_rows.add_bias(raw_target.clone()), sampling_metadata, metadata)
        target = process_logits(target, token_rows)

        # verify() takes each request's rows followed by its bonus row, which is
        # vLLM's logits layout; the bonus row is one-hot at vLLM's sampled bonus token.
        V = target.shape[-1]
        rows_in = torch.full((logits.shape[0], V), float("-inf"), device=target.device)
        rows_in[metadata.target_logits_indices] = target
        rows_in[metadata.bonus_logits_indices, bonus] = 0.0
        out = verify(rows_in, metadata.draft_token_ids.long(), list(metadata.num_draft_tokens),
                     rows.is_greedy.to(target.device), draft_probs, sampling_metadata.generators)
        out = out.to(torch.int32)

        logprobs_tensors = None
        if sampling_metadata.max_num_logprobs is not None:
            logprobs_tensors = self._get_logprobs_tensors(
                sampling_metadata.max_num_logprobs, metadata, logits,
                target if self.is_processed_logprobs_mode else raw_target,
                bonus_out.logprobs_tensors.logprobs, out,
            )
        return SamplerOutput(sampled_token_ids=out, logprobs_tensors=logprobs_tensors)


# ---------------------------------------------------------------------------
# Workers: install the DSpark runner.
# ---------------------------------------------------------------------------

from vllm.v1.worker.cpu_model_runner import CPUModelRunner  # noqa: E402
from vllm.v1.worker.cpu_worker import CPUWorker  # noqa: E402
from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # noqa: E402
from vllm.v1.worker.gpu_worker import Worker  # noqa: E402


class DSparkCPUModelRunner(DSparkRunnerMixin, CPUModelRunner):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._dspark_setup()


class DSparkWorkerMixin:
    """What both DSpark workers add: the cost profile after warm-up, and methods
    reachable with `llm.collective_rpc("dspark_info")` (or "dspark_stats", "dspark_last_round")."""

    def compile_or_warm_up_model(self):
        times = super().compile_or_warm_up_model()
        self.model_runner.dspark_load_or_measure_profile()
        if self.model_runner.drafter.options.prompt_lookup is not None:
            self.model_runner._dspark_warm_up_lookup()
        return times

    def dspark_last_round(self) -> dict:
        """Each request's latest drafting round (among the last 64 steps that drafted):
        req_id -> anchor, its position, drafted tokens, confidence logits."""
        out = {}
        for r in self.model_runner.drafter.recent_rounds:  # oldest first: later rounds overwrite
            logits = None if r.confidence_logits is None else r.confidence_logits.tolist()
            for j, req_id in enumerate(r.req_ids):
                out[req_id] = {"anchor": int(r.anchors[j]), "anchor_position": int(r.anchor_positions[j]),
                               "tokens": r.tokens[j].tolist(),
                               "confidence_logits": None if logits is None else logits[j]}
        return out

    def dspark_stats(self) -> dict | None:
        """The engine's DSpark counters, exact (Prometheus readers such as llm.get_metrics()
        round counters to ints): the driver rank's, None on the other tensor-parallel ranks."""
        drafter = self.model_runner.drafter
        return drafter.stats.as_dict() if drafter.reports_stats else None

    draft_fetches = 0  # post-step calls of the engine core for drafts (they come with the output)

    def take_draft_token_ids(self):
        self.draft_fetches += 1
        return super().take_draft_token_ids()

    def dspark_info(self) -> dict:
        drafter = self.model_runner.drafter
        return {"runner": type(self.model_runner).__name__, "draft_model": drafter.options.draft_model,
                "policy": drafter.policy.name, "shared_with_target": list(drafter.shared),
                "calibrated": drafter.maps is not None, "break_even_guard": drafter.guard is not None,
                "draft_rounds": drafter.rounds_drafted, "draft_fetches": self.draft_fetches,
                "speculative_steps": self.model_runner.speculative_steps,
                "context_writes": drafter.context_writes, "draft_dtype": str(drafter.dtype).removeprefix("torch."),
                "sps_profile": None if drafter.profile is None else drafter.profile.model_dump(),
                "prompt_lookup": None if drafter.options.prompt_lookup is None
                else drafter.options.prompt_lookup.model_dump()}


class DSparkCPUWorker(DSparkWorkerMixin, CPUWorker):
    def init_device(self):
        # CPUWorker.init_device builds `CPUModelRunner` from its module's
        # namespace; pointing that name at ours builds the runner once.
        from unittest import mock

        from vllm.v1.worker import cpu_worker

        with mock.patch.object(cpu_worker, "CPUModelRunner", DSparkCPUModelRunner):
            super().init_device()


class DSparkGPUModelRunner(DSparkRunnerMixin, GPUModelRunner):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._dspark_setup()

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        # The draft's Attention layers are built outside vLLM's device context, so their
        # scale buffers (_k_scale, _v_scale, ...) start on the CPU; vLLM's CUDA KV-cache
        # and attention kernels (Triton ones above all) read them on the device.
        self.drafter.attn_layers.to(self.device)


class DSparkGPUWorker(DSparkWorkerMixin, Worker):
    """CUDA worker. vLLM 0.32's GPU worker builds its runner in `_make_model_runner()`
    (called at the end of `init_device`); for custom_class drafters vLLM selects the
    V1 runner (the V2 runner lists custom_class as unsupported), which ours extends.
    Reviewed against vLLM's source; not run in the CPU CI."""

    def _make_model_runner(self):
        _check_cuda_config(self.vllm_config, self.use_v2_model_runner)
        return DSparkGPUModelRunner(self.vllm_config, self.device)


def _check_cuda_config(vllm_config, use_v2_model_runner: bool) -> None:
    """Refuse, with the reason, configurations the DSpark CUDA runner cannot serve."""
    problems = []
    if use_v2_model_runner:
        problems.append("vLLM's V2 model runner (DSpark extends the V1 runner, vLLM's choice for "
                        "custom_class drafters; unset VLLM_USE_V2_MODEL_RUNNER)")
    if vllm_config.scheduler_config.async_scheduling:
        problems.append("async scheduling (under it vLLM's V1 runner hands custom_class drafters no "
                        "sampled tokens; use --no-async-scheduling)")
    if vllm_config.parallel_config.use_ubatching:
        problems.append("micro-batching / dual-batch overlap (the drafter reads one slot mapping for "
                        "the whole batch; drop --enable-dbo / --ubatch-size)")
    if problems:
        raise ValueError("DSpark on CUDA does not support " + "; ".join(problems) + ".")
