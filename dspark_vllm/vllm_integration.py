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
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import torch
from vllm.logger import init_logger

from . import sps as sps_profile
from .calibration import apply_temperatures, load_calibration
from .config import DSparkOptions, PROPOSER_PATH, options_from_additional_config
from .metrics import EngineStats, serve_metrics_from
from .model.checkpoint import TargetInfo, load_draft_model, validate_checkpoint
from .model.config import DSparkConfig
from .policies import check_policy, make_policy
from .proposer import draft_block, draft_rounds
from .sampling import SamplingRows, process_logits
from .verification import num_accepted, verify

logger = init_logger("vllm.dspark")  # under vLLM's logger so its handlers apply

# ---------------------------------------------------------------------------
# Config hook: fill in worker / scheduler classes, fail early on bad input.
# ---------------------------------------------------------------------------

_WORKERS = {
    "vllm.v1.worker.cpu_worker.CPUWorker": "dspark_vllm.vllm_integration.DSparkCPUWorker",
    "vllm.v1.worker.gpu_worker.Worker": "dspark_vllm.vllm_integration.DSparkGPUWorker",
}
_SCHEDULER = "dspark_vllm.vllm_integration.DSparkScheduler"


def uses_dspark(vllm_config) -> bool:
    spec = vllm_config.speculative_config
    return spec is not None and spec.method == "custom_class" and spec.model in (
        PROPOSER_PATH, "dspark_vllm.vllm_integration.DSparkProposer")


def configure(vllm_config) -> None:
    """Complete and check a vLLM config that asks for DSpark (idempotent)."""
    if not uses_dspark(vllm_config):
        return
    options = options_from_additional_config(vllm_config.additional_config)
    draft_config = validate_checkpoint(
        options.draft_model,
        TargetInfo.from_hf_config(vllm_config.model_config.hf_config),
        vllm_config.speculative_config.num_speculative_tokens,
    )
    if options.calibration:
        load_calibration(options.calibration, draft_config.block_size)
    if options.sps_profile:
        sps_profile.load_profile(options.sps_profile)
    check_policy(options.verification, options.model_dump(), draft_config.enable_confidence_head)
    if options.metrics_path is None:
        # The engine process writes here; this (front-end) process serves it on /metrics.
        path = Path(tempfile.gettempdir()) / "dspark-vllm" / f"metrics-{uuid.uuid4().hex}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        dspark = {**vllm_config.additional_config["dspark"], "metrics_path": str(path)}
        vllm_config.additional_config = {**vllm_config.additional_config, "dspark": dspark}
        options = options_from_additional_config(vllm_config.additional_config)
    serve_metrics_from(options.metrics_path)
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
        super().__init__(vllm_config, *args, **kwargs)

    @property
    def num_lookahead_tokens(self) -> int:
        return self._dspark_lookahead

    @num_lookahead_tokens.setter
    def num_lookahead_tokens(self, value: int) -> None:
        pass  # vLLM's own value (0 for custom_class) is superseded


# ---------------------------------------------------------------------------
# The proposer: draft model + its attention layers in vLLM's paged KV cache.
# ---------------------------------------------------------------------------


class DSparkProposer:
    """The `custom_class` drafter. Built by vLLM's runner with the config only."""

    LAYER_PREFIX = "dspark_draft.layers"

    def __init__(self, vllm_config):
        self.vllm_config = vllm_config
        self.options: DSparkOptions = options_from_additional_config(vllm_config.additional_config)
        target = TargetInfo.from_hf_config(vllm_config.model_config.hf_config)
        self.num_tokens = vllm_config.speculative_config.num_speculative_tokens
        self.draft_config = validate_checkpoint(self.options.draft_model, target, self.num_tokens)
        self.num_target_layers = target.num_hidden_layers
        self.policy = make_policy(self.options.verification, self.options.model_dump(),
                                  confidence_head=self.draft_config.enable_confidence_head)
        self.temperatures = None  # per-position STS temperatures, if calibrated
        if self.options.calibration:
            self.temperatures = load_calibration(self.options.calibration,
                                                 self.draft_config.block_size).temperatures
        self.profile = None  # SPSProfile, set by the runner before serving
        self.step_overhead_s = 0.0  # running mean of measured - profiled step time
        self.stats = EngineStats(policy=self.policy.name, block_size=self.num_tokens)
        self.model = None
        self.attn_layers: list = []
        self.layer_names: list[str] = []
        # req_id -> (verified drafts, their q rows or None, calibrated survival a_k or None)
        self.pending: dict[str, tuple[list[int], torch.Tensor | None, list[float] | None]] = {}
        # Each request's latest drafting round (the last 1024 requests), for checks
        # against the dense reference; kept after a request finishes.
        self.last_round: dict[str, dict] = {}
        self.shared: list[str] = []  # draft weights that alias the target's

    def load_model(self, target_model) -> None:
        from vllm.model_executor.layers.attention import Attention

        cfg = self.draft_config
        device = next(target_model.parameters()).device
        self.model = load_draft_model(self.options.draft_model, self.vllm_config.model_config.dtype, device)
        self.share_with_target(target_model)
        logger.info("DSpark draft %s loaded: block_size=%d, verifying up to %d tokens, "
                    "policy=%s, shared with target: %s", self.options.draft_model, cfg.block_size,
                    self.num_tokens, self.policy.name, self.shared or "nothing")
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
        fused = self.model.fuse_target_features(target_features.to(self.model.fc.weight.dtype))
        for layer, attn in zip(self.model.layers, self.attn_layers):
            k, v = layer.self_attn.keys_values(fused, positions)
            attn.impl.do_kv_cache_update(attn, k, v, attn.kv_cache, slot_mapping)

    # -- confidence-scheduled verification ---------------------------------
    def calibrated_confidences(self, drafts) -> torch.Tensor | None:
        """c_k after STS: sigmoid(z_k / T_k); the raw head output when not calibrated."""
        if drafts.confidence_logits is None:
            return None
        if self.temperatures is None:
            return drafts.confidences.float()
        return apply_temperatures(drafts.confidence_logits.float(), self.temperatures)

    def verify_lengths(self, confidences, num_drafting: int, other_tokens: int) -> list[int]:
        """How many drafts of each drafting request go to verification next step.

        other_tokens: tokens of the same forward pass the policy does not
        schedule (requests that did not draft this round), counted into B.
        """
        profile = None if self.profile is None else sps_profile.WithOverhead(self.profile, self.step_overhead_s)
        return [int(x) for x in self.policy.lengths(confidences, self.num_tokens, num_drafting,
                                                    other_tokens=other_tokens, profile=profile)]

    def remember_round(self, rounds: dict[str, dict], keep: int = 1024) -> None:
        for req_id, info in rounds.items():
            self.last_round.pop(req_id, None)
            self.last_round[req_id] = info
        for req_id in list(self.last_round)[:-keep]:
            del self.last_round[req_id]

    def forget(self, req_id: str) -> None:
        self.pending.pop(req_id, None)


# ---------------------------------------------------------------------------
# The model runner: hidden states in, variable-length drafts out.
# ---------------------------------------------------------------------------


def sampling_rows(sampling_metadata, num_reqs: int) -> SamplingRows:
    """Per-request temperature / top-k / top-p from vLLM's metadata.

    (vLLM 0.32 drops its min-p and logit-bias processors whenever speculative
    decoding is configured, so there is no min-p to read here.)
    """
    temp = sampling_metadata.temperature
    temp = torch.zeros(num_reqs) if temp is None else temp[:num_reqs].float().cpu()
    top_k = None if sampling_metadata.top_k is None else sampling_metadata.top_k[:num_reqs].cpu()
    top_p = None if sampling_metadata.top_p is None else sampling_metadata.top_p[:num_reqs].float().cpu()
    return SamplingRows(temp, top_k, top_p)


class DSparkRunnerMixin:
    """Overrides on vLLM's V1 GPUModelRunner / CPUModelRunner."""

    def _dspark_setup(self) -> None:
        self.use_aux_hidden_state_outputs = True
        self.drafter.runner = self
        self.rejection_sampler = DSparkRejectionSampler(
            self.sampler, self.speculative_config, self.device, self.drafter)

    def _get_eagle3_aux_layers_from_config(self):
        # vLLM records aux state j = input of layer j = output of layer j-1.
        return tuple(i + 1 for i in self.drafter.draft_config.target_layer_ids)

    def _input_fits_in_drafter(self, *args, **kwargs) -> bool:
        return True  # decided per request in propose_draft_token_ids

    def _on_request_state_removed(self, req_id, req_state) -> None:
        super()._on_request_state_removed(req_id, req_state)
        self.drafter.forget(req_id)

    def _dspark_group(self):
        name = self.drafter.layer_names[0]
        for gid, group in enumerate(self.kv_cache_config.kv_cache_groups):
            if name in group.layer_names:
                for attn_group in self.attn_groups[gid]:
                    if name in attn_group.layer_names:
                        return gid, attn_group.get_metadata_builder()
        raise RuntimeError(f"draft attention layer {name} has no KV cache group")

    @torch.inference_mode()
    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, sampling_metadata,
                                hidden_states, sample_hidden_states, aux_hidden_states,
                                spec_decode_metadata, common_attn_metadata, slot_mappings):
        drafter: DSparkProposer = self.drafter
        n = scheduler_output.total_num_scheduled_tokens
        # 1. Every scheduled token becomes draft context (prefill chunks too).
        features = torch.cat([h[:n] for h in aux_hidden_states], dim=-1)
        positions = self.positions[:n]
        if isinstance(slot_mappings, list):
            slot_mappings = slot_mappings[0]
        drafter.write_context(features, positions, slot_mappings[drafter.layer_names[0]][:n])

        # 2. Requests with a fresh anchor (not mid-prefill) and room for a block.
        num_reqs = self.input_batch.num_reqs
        req_ids = self.input_batch.req_ids[:num_reqs]
        gid, builder = self._dspark_group()
        table = self.input_batch.block_table[gid]
        gamma = drafter.draft_config.block_size
        rows, anchors, anchor_pos = [], [], []
        for i, toks in enumerate(sampled_token_ids[:num_reqs]):
            pos = int(self.input_batch.num_tokens_no_spec[i]) - 1
            have_blocks = int(table.num_blocks_per_row[i]) * table.block_size
            if toks and pos + gamma <= min(self.max_model_len, have_blocks):
                rows.append(i)
                anchors.append(toks[-1])
                anchor_pos.append(pos)
        drafts: list[list[int]] = [[] for _ in range(num_reqs)]
        for req_id in req_ids:
            drafter.forget(req_id)
        if not rows:
            return drafts

        # 3. One parallel block forward on the paged KV cache + the Markov loop.
        device = features.device
        rows_t = torch.tensor(rows, device=device)
        anchors_t = torch.tensor(anchors, device=device, dtype=torch.long)
        anchor_pos_t = torch.tensor(anchor_pos, device=device, dtype=torch.long)
        attend = self._paged_block_attention(builder, table.get_device_tensor(num_reqs)[rows_t],
                                             table.block_size, anchor_pos_t, gamma)
        rows_sampling = sampling_rows(sampling_metadata, num_reqs).index(torch.tensor(rows))
        generators = {j: sampling_metadata.generators[i] for j, i in enumerate(rows)
                      if i in sampling_metadata.generators}
        out = draft_block(drafter.model, anchors_t, anchor_pos_t, attend, drafter.num_tokens,
                          rows_sampling, generators)

        # 4. Verification lengths from the policy; keep q and the predicted
        #    survival for the acceptance step.
        confidences = drafter.calibrated_confidences(out)
        lengths = drafter.verify_lengths(confidences, len(rows), num_reqs - len(rows))
        survival = None if confidences is None else confidences.cumprod(-1).tolist()
        tokens = out.tokens.tolist()
        for j, i in enumerate(rows):
            L = lengths[j]
            drafts[i] = tokens[j][:L]
            probs = None if out.probs is None or bool(rows_sampling.is_greedy[j]) else out.probs[j, :L]
            drafter.pending[req_ids[i]] = (drafts[i], probs, None if survival is None else survival[j][:L])
        conf_logits = None if out.confidence_logits is None else out.confidence_logits.tolist()
        drafter.remember_round({
            req_ids[i]: {"anchor": anchors[j], "anchor_position": anchor_pos[j], "tokens": tokens[j],
                         "confidence_logits": None if conf_logits is None else conf_logits[j]}
            for j, i in enumerate(rows)})
        drafter.stats.record_drafts(len(rows), drafter.num_tokens, lengths)
        self._dspark_end_step(n)
        return drafts

    # -- step timing and metrics ------------------------------------------
    def execute_model(self, *args, **kwargs):
        self._dspark_step_start = time.perf_counter()
        return super().execute_model(*args, **kwargs)

    def _dspark_end_step(self, num_scheduled_tokens: int) -> None:
        """Measured vs profiled step time (target forward + draft), then publish the metrics."""
        drafter: DSparkProposer = self.drafter
        start = getattr(self, "_dspark_step_start", None)
        if start is not None:
            measured = time.perf_counter() - start
            profiled = None if drafter.profile is None else 1.0 / drafter.profile.sps(num_scheduled_tokens)
            drafter.stats.record_step_time(measured, profiled)
            if profiled is not None:
                # What the profile does not see (sampling, verification, bookkeeping), learned
                # from finished steps only: it never depends on the drafts being scheduled.
                drafter.step_overhead_s += 0.1 * (max(0.0, measured - profiled) - drafter.step_overhead_s)
            self._dspark_step_start = None
        if drafter.options.metrics_path:
            drafter.stats.publish(drafter.options.metrics_path)

    # -- engine cost profile SPS(B) ----------------------------------------
    def dspark_load_or_measure_profile(self) -> None:
        """Give the drafter its SPS(B) table: a configs/ file, the disk cache, or a fresh measurement."""
        drafter: DSparkProposer = self.drafter
        opts = drafter.options
        if opts.sps_profile:
            profile, source = sps_profile.load_profile(opts.sps_profile), opts.sps_profile
        elif drafter.policy.name not in ("sync", "async"):
            return  # fixed / threshold never look at the cost curve
        else:
            max_tokens = self.scheduler_config.max_num_batched_tokens
            settings = {"max_num_batched_tokens": max_tokens, "dtype": str(self.model_config.dtype),
                        "block_size": drafter.draft_config.block_size, "draft": opts.draft_model,
                        "enforce_eager": self.model_config.enforce_eager,
                        "threads": torch.get_num_threads(), "vllm": _vllm_version(), "profile_format": 3}
            cache_dir = opts.sps_cache_dir or os.path.expanduser("~/.cache/dspark_vllm/sps")
            path = sps_profile.cache_path(cache_dir, self.model_config.model, _hardware_name(self.device),
                                          settings)
            if path.exists():
                profile, source = sps_profile.load_profile(path), f"cache {path}"
            else:
                profile = self._dspark_measure_profile(max_tokens, settings)
                profile.save(path)
                source = f"measured, cached at {path}"
        drafter.profile = profile
        logger.info("DSpark engine cost profile (%s): %s", source, profile.summary())

    def _dspark_measure_profile(self, max_tokens: int, settings: dict):
        """Time one verification step per batch size B: target forward over B tokens + draft block.

        The target runs vLLM's own dummy forward (same kernels and padding as
        serving, without attention over a long context); the drafter runs its
        block for the number of requests that B tokens of full blocks imply.
        """
        drafter: DSparkProposer = self.drafter
        points = {}
        for B in sps_profile.measure_sizes(max_tokens):
            num_reqs = max(1, B // (drafter.num_tokens + 1))
            self._dummy_run(B)
            _time_draft_block(drafter, num_reqs)
            target_s = _best_time(lambda: self._dummy_run(B))
            draft_s = _best_time(lambda: _time_draft_block(drafter, num_reqs))
            points[B] = target_s + draft_s
        # A bigger batch never takes less time; a dip is timing noise, and noise
        # in the curve stops Algorithm 1's early stop at the wrong place.
        slowest = 0.0
        for B in sorted(points):
            slowest = max(slowest, points[B])
            points[B] = 1.0 / slowest
        # Eager engines (the CPU) do not pad batches to buckets: interpolate between sizes.
        shape = "linear" if self.device.type == "cpu" or self.model_config.enforce_eager else "step"
        return sps_profile.make_profile(points, self.model_config.model, _hardware_name(self.device),
                                        settings, shape=shape)

    def _paged_block_attention(self, builder, block_table, block_size, anchor_pos, gamma):
        """attend() for draft blocks whose context K/V sit in vLLM's paged cache.

        Block slot k of request r is at position anchor_pos[r] + k; its K/V go
        into the look-ahead slots reserved by DSparkScheduler, and its query
        attends (non-causally) to all positions < anchor_pos[r] + gamma.
        """
        from vllm.forward_context import set_forward_context
        from vllm.v1.attention.backend import CommonAttentionMetadata

        B = anchor_pos.shape[0]
        pos = anchor_pos[:, None] + torch.arange(gamma, device=anchor_pos.device)
        blocks = block_table.gather(1, (pos // block_size).long())
        slots = (blocks.long() * block_size + pos % block_size).flatten()
        qsl = torch.arange(0, (B + 1) * gamma, gamma, dtype=torch.int32, device=anchor_pos.device)
        seq_lens = (anchor_pos + gamma).to(torch.int32)
        common = CommonAttentionMetadata(
            query_start_loc=qsl, query_start_loc_cpu=qsl.cpu(), seq_lens=seq_lens, num_reqs=B,
            num_actual_tokens=B * gamma, max_query_len=gamma, max_seq_len=int(seq_lens.max()),
            block_table_tensor=block_table, slot_mapping=slots, causal=False, positions=pos.flatten(),
        )
        meta = builder.build(common_prefix_len=0, common_attn_metadata=common)
        names = self.drafter.layer_names
        layers = self.drafter.attn_layers

        def attend(i, q, k, v):
            T = q.shape[0]
            with set_forward_context({name: meta for name in names}, self.vllm_config, num_tokens=T,
                                     slot_mapping={name: slots for name in names}):
                return layers[i](q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1))

        return attend


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


def _hardware_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu:{platform.processor() or platform.machine()}:{torch.get_num_threads()}threads"


def _best_time(fn, repeats: int = 3) -> float:
    """Fastest of a few runs: the cost of the step itself, without scheduling noise."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _time_draft_block(drafter, num_reqs: int, context: int = 16) -> None:
    """One draft block for num_reqs requests over a short dense context (for profiling)."""
    cfg = drafter.draft_config
    device, dtype = drafter.model.fc.weight.device, drafter.model.fc.weight.dtype
    features = torch.zeros(context + 1, cfg.fc_in_features, device=device, dtype=dtype)
    text = torch.zeros(context + 1, dtype=torch.long, device=device)
    draft_rounds(drafter.model, features, text, torch.full((num_reqs,), context, device=device),
                 num_tokens=drafter.num_tokens)


# ---------------------------------------------------------------------------
# Verification: exact speculative sampling in place of vLLM's rejection sampler.
# ---------------------------------------------------------------------------

from vllm.v1.sample.rejection_sampler import RejectionSampler  # noqa: E402


class DSparkRejectionSampler(RejectionSampler):
    """Exact verification with per-request lengths and full draft probabilities.

    Draft rows get vLLM's logits processors (penalties with the draft prefix,
    bad words, allowed tokens, min-tokens), then temperature, min-p, top-k and
    top-p exactly in the order of vLLM's sampler. The bonus token is sampled by
    vLLM's own sampler, as in plain decoding, independently of acceptance.
    """

    def __init__(self, sampler, spec_config, device, proposer: DSparkProposer):
        super().__init__(sampler, spec_config, device)
        self.proposer = proposer

    def draft_probs_for(self, metadata, vocab: int, device) -> torch.Tensor:
        """[num_draft_total, V] q rows; zero rows mean a deterministic draft."""
        probs = torch.zeros(len(metadata.draft_token_ids), vocab, device=device)
        drafted = metadata.draft_token_ids.tolist()
        start = 0
        for req_id, num in zip(self.proposer.runner.input_batch.req_ids, metadata.num_draft_tokens):
            pending = self.proposer.pending.get(req_id)
            if num and pending is not None:
                tokens, q, _ = pending
                if drafted[start:start + num] != tokens[:num]:
                    raise RuntimeError(f"request {req_id}: scheduled drafts differ from proposed ones")
                if q is not None:
                    probs[start:start + num] = q[:num].to(device)
            start += num
        return probs

    def record_outcomes(self, metadata, out: torch.Tensor) -> None:
        """Verified vs accepted per position, and the survival that was predicted for them."""
        accepted = num_accepted(out).tolist()
        req_ids = self.proposer.runner.input_batch.req_ids
        for r, (req_id, num) in enumerate(zip(req_ids, metadata.num_draft_tokens)):
            if num:
                pending = self.proposer.pending.get(req_id)
                survival = None if pending is None else pending[2]
                self.proposer.stats.record_verification(num, accepted[r], survival)

    def forward(self, metadata, draft_probs, logits, sampling_metadata):
        num_reqs = len(metadata.num_draft_tokens)
        bonus_out = self.sampler(
            logits=logits[metadata.bonus_logits_indices],
            sampling_metadata=replace(sampling_metadata, max_num_logprobs=-1),
            predict_bonus_token=True,
            logprobs_mode_override="processed_logits" if self.is_processed_logprobs_mode else "raw_logits",
        )
        bonus = bonus_out.sampled_token_ids.view(-1).long()

        raw_target = logits[metadata.target_logits_indices].float()
        target = self.apply_logits_processors(raw_target.clone(), sampling_metadata, metadata)
        counts = torch.tensor(metadata.num_draft_tokens)
        rows = sampling_rows(sampling_metadata, num_reqs)
        target = process_logits(target, rows.expand(counts))

        # verify() wants each request's rows followed by its bonus row; the
        # bonus row is one-hot at vLLM's sampled bonus token.
        V = target.shape[-1]
        one_hot = torch.full((num_reqs, V), float("-inf"), device=target.device)
        one_hot.scatter_(1, bonus[:, None], 0.0)
        pieces, start = [], 0
        for r, num in enumerate(metadata.num_draft_tokens):
            pieces += [target[start:start + num], one_hot[r:r + 1]]
            start += num
        q = self.draft_probs_for(metadata, V, target.device)
        out = verify(torch.cat(pieces), metadata.draft_token_ids.long(), list(metadata.num_draft_tokens),
                     rows.is_greedy.to(target.device), q, sampling_metadata.generators)
        out = out.to(torch.int32)
        self.record_outcomes(metadata, out)

        from vllm.v1.outputs import SamplerOutput

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
from vllm.v1.worker.gpu_worker import Worker  # noqa: E402


class DSparkCPUModelRunner(DSparkRunnerMixin, CPUModelRunner):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._dspark_setup()


class DSparkWorkerMixin:
    """What both DSpark workers add: the cost profile after warm-up, and methods
    reachable with `llm.collective_rpc("dspark_info")` (or "dspark_last_round")."""

    def compile_or_warm_up_model(self):
        times = super().compile_or_warm_up_model()
        self.model_runner.dspark_load_or_measure_profile()
        return times

    def dspark_last_round(self) -> dict:
        """The latest drafting round: req_id -> anchor, its position, drafted tokens, confidence logits."""
        return self.model_runner.drafter.last_round

    def dspark_info(self) -> dict:
        drafter = self.model_runner.drafter
        return {"runner": type(self.model_runner).__name__, "draft_model": drafter.options.draft_model,
                "policy": drafter.policy.name, "shared_with_target": list(drafter.shared),
                "calibrated": drafter.temperatures is not None,
                "sps_profile": None if drafter.profile is None else drafter.profile.model_dump()}


class DSparkCPUWorker(DSparkWorkerMixin, CPUWorker):
    def init_device(self):
        # CPUWorker.init_device builds `CPUModelRunner` from its module's
        # namespace; pointing that name at ours builds the runner once.
        from unittest import mock

        from vllm.v1.worker import cpu_worker

        with mock.patch.object(cpu_worker, "CPUModelRunner", DSparkCPUModelRunner):
            super().init_device()


class DSparkGPUWorker(DSparkWorkerMixin, Worker):
    """CUDA worker (V1 runner). Written to the same contract; not run on CPU CI."""

    def _make_model_runner(self):
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        class DSparkGPUModelRunner(DSparkRunnerMixin, GPUModelRunner):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self._dspark_setup()

        return DSparkGPUModelRunner(self.vllm_config, self.device)
