"""Speed of DSpark against its peers, in one run: plain vLLM, DSpark under each
policy, and vLLM's built-in n-gram speculation, on the same prompts and engine settings.

    python scripts/bench_speed.py --target T --draft D --prompts P.jsonl \
        --concurrency 1,4,16,64 --json OUT.json [--plot OUT.png] [--policies fixed,sync,async]
        [--calibration CAL.json] [--max-tokens 128] [--num-prompts 64] [--raw] [--dtype auto]
        [--repeats 3] [--min-seconds 4] [--draft-dtype auto] [--enforce-eager]

One engine (AsyncLLM, in this process) per row: `plain`, `dspark-<policy>` and
`ngram`. A policy written `<policy>+lookup` (e.g. `fixed+lookup`) runs with
prompt lookup beside the drafter (`prompt_lookup`, dspark_vllm/lookup.py) and
engine_kwargs' num_speculative_tokens for it (23: lookup's blocks may run past
the drafter's); `<policy>+lookup<N>` (e.g. `fixed+lookup7`) sets N instead. `--ngram-tokens 7,23`
adds an n-gram row per value (`ngram` for 7, the issue's peer; `ngram-23`). At
concurrency c, c clients take the prompts from one queue, one request at a time,
until every prompt was answered (so each level does the same work; c=1 is
requests one by one, c=64 about one batch).

Each level runs once unmeasured on its engine (a warm-up; --no-warmup: none),
then is measured over passes until they add up to --min-seconds of wall time
(4 s by default, at least one pass); its speed is the tokens of all measured
passes over their time. A pass at c=64 takes about a second here, and
one-second passes of the same engine read up to 20% apart on shared cores.
A fresh engine's first pass at a load level pays one-time costs that a
serving engine has long paid: vLLM's CPU GEMMs (oneDNN) build a kernel for
every new number of rows on first use (about 0.6 ms per GEMM here, so about
10 ms for the default pair's target forward), and speculation verifies a
different number of rows nearly every step, so it meets many more new row
counts than plain decoding does; the break-even guard also measures a new
load level first. The first pass's speed is reported too
(`cold_*`). Per row and c:

  output_tokens_per_s   generated tokens / wall time of the level's measured passes
  passes                how many passes were measured (requests, tokens: their totals)
  ratio_to_plain        output_tokens_per_s / plain's at the same c (and round)
  ratio_range           lowest and highest ratio over the rounds (--repeats)
  cold_output_tokens_per_s, cold_ratio_to_plain   the same for the level's first
                        pass (the unmeasured warm-up; absent with --no-warmup)
  tau                   tokens emitted per drafting request and round, bonus
                        included (DSpark: the plugin's counters; ngram: vLLM's,
                        which count only the steps where prompt lookup found a
                        match, so n-gram emits fewer tokens per step than its tau)
  tokens_per_step       output tokens per engine step, every step counted (prefill
                        steps and steps that speculated nothing included): at c=1
                        what one step of the one request buys, the number to set
                        against the step's cost (DSpark: the plugin's step counter;
                        ngram: the count of vLLM's per-step histogram
                        vllm:iteration_tokens_total; plain: absent, 1 at c=1). At
                        higher c it is the batch's tokens per step.
  drafting_step_fraction  share of engine steps in which the drafter ran
                        (the break-even guard skips the others; DSpark only)
  model_dtype           what the engine's model ran in (--dtype; the checkpoint's by default)
  draft_dtype           what the drafter ran in (DSpark only; --draft-dtype, auto by default)
  policy, prompt_lookup the verification policy and the prompt_lookup options the
                        engine ran with (DSpark only, from dspark_info; null: lookup off)
  num_speculative_tokens  the engine's (speculative rows only)
  identical_to_plain    greedy: every answer of the first measured pass equals plain
                        decoding's (null when sampling)
  answers_differing, first_difference_at   greedy: how many answers differ from plain
                        decoding's, and at which token each first does

With --repeats N every engine runs N times, every other round in reverse
order; a row reports the median (speed, ratio) and keeps each round's row in
`rounds`. On shared cores the host's speed drifts by tens of percent over
minutes, so one round's ratios can mislead; the range shows how far.

The output records the host (CPU, threads, whether it has native bf16 GEMMs):
on the CPU the ratios depend on it. The model's own dtype by default
(`--dtype auto`: what users run, bf16 for the default pair).
"""

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import time
import uuid

NGRAM = {"method": "ngram", "num_speculative_tokens": 7, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def pair_arguments(ap: argparse.ArgumentParser, num_prompts: int = 64) -> argparse.ArgumentParser:
    """The arguments of every script that runs a target and drafter on a prompt file."""
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--prompts", required=True, help='JSONL of {"turns": [...]}')
    ap.add_argument("--json", required=True)
    ap.add_argument("--raw", action="store_true", help="prompts are raw text (base/code model)")
    ap.add_argument("--num-prompts", type=int, default=num_prompts)
    ap.add_argument("--max-tokens", type=int, default=128)
    return ap


def parse_args(argv=None):
    ap = pair_arguments(argparse.ArgumentParser(description=__doc__,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    ap.add_argument("--plot", default=None)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--policies", default="fixed,sync,async")
    ap.add_argument("--no-ngram", action="store_true", help="leave out vLLM's n-gram speculation")
    ap.add_argument("--ngram-tokens", default=str(NGRAM["num_speculative_tokens"]),
                    help="num_speculative_tokens of the n-gram rows, one row per value (e.g. 7,23)")
    ap.add_argument("--calibration", default=None, help="STS calibration JSON for the policies")
    ap.add_argument("--sps-profile", default=None, help="engine cost table instead of profiling")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--dtype", default="auto", help="engine dtype (default: the checkpoint's)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds of every engine (alternating order); rows report the median and range")
    ap.add_argument("--draft-dtype", default="auto", choices=["auto", "model", "float32"],
                    help="the drafter's dtype (DSparkOptions.draft_dtype; auto: float32 where the CPU emulates bf16)")
    ap.add_argument("--min-seconds", type=float, default=4.0,
                    help="measure each level over passes until their wall time adds up to this (at least one pass)")
    ap.add_argument("--no-warmup", action="store_true",
                    help="measure each level on its first pass (default: run it once unmeasured first; see above)")
    ap.add_argument("--enforce-eager", action="store_true",
                    help="run the target eagerly (default: vLLM's default, as `vllm serve` and `vllm.LLM` run "
                         "it: torch.compile on the CPU, compiled and CUDA graphs on a GPU)")
    return ap.parse_args(argv)


def ngram_name(k: int) -> str:
    return "ngram" if k == NGRAM["num_speculative_tokens"] else f"ngram-{k}"


def ngram_tokens(name: str) -> int:
    return int(name.removeprefix("ngram-")) if name != "ngram" else NGRAM["num_speculative_tokens"]


async def run_level(engine, prompts, concurrency, params):
    """c clients drain one queue of prompts; returns ({prompt index: token ids}, wall seconds)."""
    queue = list(range(len(prompts)))[::-1]
    answers = {}

    async def client():
        while queue:
            i = queue.pop()
            final = None
            async for out in engine.generate({"prompt_token_ids": prompts[i]}, params, request_id=uuid.uuid4().hex):
                final = out
            answers[i] = list(final.outputs[0].token_ids)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return answers, time.perf_counter() - start


async def dspark_counters(engine):
    """The plugin's counters, exact, from the engine's driver worker."""
    s = (await engine.collective_rpc("dspark_stats"))[0]
    return {"rounds": s["drafted"][0], "accepted": sum(s["accepted"]), "steps": s["steps"],
            "drafting_steps": s["drafting_steps"]}


NGRAM_COUNTERS = {"rounds": "vllm:spec_decode_num_drafts_total",
                  "accepted": "vllm:spec_decode_num_accepted_tokens_total",
                  "steps": "vllm:iteration_tokens_total_count"}  # one observation per engine step


async def ngram_counters(engine):
    """vLLM's own counters (drafts, accepted tokens, engine steps) from the Prometheus registry."""
    from prometheus_client import REGISTRY

    values = {}
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name in NGRAM_COUNTERS.values():
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return {key: values.get(name, 0.0) for key, name in NGRAM_COUNTERS.items()}


async def bench_engine(args, name, prompts, levels):
    import dspark_vllm
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    kwargs = {}
    if name.startswith("dspark-"):
        options = {k: v for k, v in (("calibration", args.calibration), ("sps_profile", args.sps_profile))
                   if v is not None}
        options["draft_dtype"] = args.draft_dtype
        policy, lookup, tokens = name.removeprefix("dspark-").partition("+lookup")
        if lookup:
            options["prompt_lookup"] = {}
        kwargs = dspark_vllm.engine_kwargs(args.draft, int(tokens) if tokens else None, verification=policy,
                                           **options)
    elif name.startswith("ngram"):
        kwargs = {"speculative_config": dict(NGRAM, num_speculative_tokens=ngram_tokens(name))}
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=args.target, dtype=args.dtype, max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
        max_num_seqs=max(levels), seed=0, disable_log_stats=not name.startswith("ngram"), **kwargs))
    is_dspark = name.startswith("dspark-")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, ignore_eos=True)
    rows, answers = [], {}
    try:
        await run_level(engine, prompts[:2], 2, params)  # warm-up
        for c in levels:
            cold = None if args.no_warmup else await run_level(engine, prompts, c, params)
            before = await (dspark_counters(engine) if is_dspark else ngram_counters(engine))
            got, wall, passes, tokens = None, 0.0, 0, 0
            while passes == 0 or wall < args.min_seconds:
                answers_now, seconds = await run_level(engine, prompts, c, params)
                got = got or answers_now  # the first measured pass is compared with plain decoding
                wall, passes, tokens = wall + seconds, passes + 1, tokens + sum(len(t) for t in answers_now.values())
            after = await (dspark_counters(engine) if is_dspark else ngram_counters(engine))
            delta = {k: after[k] - before[k] for k in after}
            row = {"engine": name, "concurrency": c, "output_tokens_per_s": tokens / wall, "wall_s": wall,
                   "passes": passes, "requests": passes * len(got), "tokens": tokens,
                   "model_dtype": str(engine.model_config.dtype).removeprefix("torch."),
                   "tau": 1 + delta["accepted"] / delta["rounds"] if delta["rounds"] else None}
            if "speculative_config" in kwargs:
                row["num_speculative_tokens"] = kwargs["speculative_config"]["num_speculative_tokens"]
            if delta.get("steps"):  # plain decoding runs without vLLM's stats: none
                row["tokens_per_step"] = tokens / delta["steps"]
            if cold is not None:
                row["cold_output_tokens_per_s"] = sum(len(t) for t in cold[0].values()) / cold[1]
            if is_dspark:
                row["drafting_step_fraction"] = delta["drafting_steps"] / max(delta["steps"], 1.0)
                info = (await engine.collective_rpc("dspark_info"))[0]
                row.update(draft_dtype=info["draft_dtype"], policy=info["policy"], prompt_lookup=info["prompt_lookup"])
            rows.append(row)
            answers[c] = got
            print(json.dumps(row), flush=True)
    finally:
        engine.shutdown()
        del engine
        gc.collect()
    return rows, answers


def load_prompts(target: str, path: str, limit: int, raw: bool) -> list[list[int]]:
    """Token ids of the first turn of up to `limit` records (chat template unless raw)."""
    from transformers import AutoTokenizer

    from dspark_vllm.prompts import load_turns, prompt_token_ids

    tok = AutoTokenizer.from_pretrained(target)
    return [prompt_token_ids(tok, t, raw) for t in load_turns(path, limit)]


def compare_to_plain(results: list[dict], answers: dict, temperature: float) -> None:
    """Each row's speed relative to plain decoding at the same c in the same round, and
    (greedy) how often and where its answers depart from plain decoding's (bf16 near-ties)."""
    plain = {r["concurrency"]: r for r in results if r["engine"] == "plain"}
    for r in results:
        base = plain[r["concurrency"]]
        r["ratio_to_plain"] = r["output_tokens_per_s"] / base["output_tokens_per_s"]
        if "cold_output_tokens_per_s" in r:
            r["cold_ratio_to_plain"] = r["cold_output_tokens_per_s"] / base["cold_output_tokens_per_s"]
        if temperature == 0:
            mine, plain_answers = answers[r["engine"]][r["concurrency"]], answers["plain"][r["concurrency"]]
            r["identical_to_plain"] = mine == plain_answers
            diverged = [first_difference(mine[i], plain_answers[i]) for i in plain_answers]
            r["answers_differing"] = sum(d is not None for d in diverged)
            r["first_difference_at"] = sorted(d for d in diverged if d is not None)


def combine_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per engine and c: the median round's speed and ratio (each ratio taken
    within its round), the range of the ratio over rounds, and every round's rows."""
    combined = []
    for first in rounds[0]:
        same = [r for rows in rounds for r in rows
                if (r["engine"], r["concurrency"]) == (first["engine"], first["concurrency"])]
        by_ratio = sorted(same, key=lambda r: r["ratio_to_plain"])  # `same` stays in round order
        ratios = [r["ratio_to_plain"] for r in by_ratio]
        row = dict(by_ratio[(len(same) - 1) // 2])
        row["output_tokens_per_s"] = statistics.median(r["output_tokens_per_s"] for r in same)
        row["ratio_to_plain"] = statistics.median(ratios)
        row["ratio_range"] = [ratios[0], ratios[-1]]
        for key in ("cold_output_tokens_per_s", "cold_ratio_to_plain"):
            if key in first:
                row[key] = statistics.median(r[key] for r in same)
        if "identical_to_plain" in first:
            row["identical_to_plain"] = all(r["identical_to_plain"] for r in same)
            row["answers_differing"] = max(r["answers_differing"] for r in same)
        row["rounds"] = [{k: v for k, v in r.items() if k not in ("engine", "concurrency")} for r in same]
        combined.append(row)
    return combined


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where two answers differ (None: identical)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["engine"] for r in result["results"]):
        rs = [r for r in result["results"] if r["engine"] == name]
        xs = [r["concurrency"] for r in rs]
        peer = name == "plain" or name.startswith("ngram")
        style = {"marker": "o", "linestyle": "--" if peer else "-"}
        axes[0].plot(xs, [r["output_tokens_per_s"] for r in rs], label=name, **style)
        ratio = [r["ratio_to_plain"] for r in rs]
        spread = [[m - r["ratio_range"][0] for m, r in zip(ratio, rs)], [r["ratio_range"][1] - m for m, r in zip(ratio, rs)]]
        axes[1].errorbar(xs, ratio, yerr=spread, capsize=3, label=name, **style)
    axes[1].axhline(1.0, color="grey", linewidth=0.8)
    rounds = len(result["results"][0]["rounds"])
    for ax, title in zip(axes, ["output tokens/s" + (f" (median of {rounds} rounds)" if rounds > 1 else ""),
                                "speed relative to plain decoding" + (" (bars: range)" if rounds > 1 else "")]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"{os.path.basename(result['target'].rstrip('/'))}, {result['dtype']}, "
                 f"T={result['temperature']}, {result['max_tokens']} tokens"
                 + (f"; {h['cpu']} ({h['capability']}), {h['threads']} threads" if (h := result.get("host")) else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def host() -> dict:
    """The machine: speed ratios on the CPU depend on its GEMM instructions (see draft_dtype)."""
    import platform

    import torch

    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    cpu = torch.cpu
    return {"cpu": name, "threads": torch.get_num_threads(), "capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": cpu._is_avx512_bf16_supported(), "amx": cpu._is_amx_tile_supported()}


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from transformers import AutoConfig

    if args.dtype == "auto":
        # The checkpoint's dtype, passed on explicitly: vLLM's own "auto" downcasts a
        # float32 checkpoint to bf16 on CPUs with native bf16, so the row would not run
        # in the dtype it reports.
        args.dtype = str(AutoConfig.from_pretrained(args.target).dtype).removeprefix("torch.")
    prompts = load_prompts(args.target, args.prompts, args.num_prompts, args.raw)
    too_long = [i for i, p in enumerate(prompts) if len(p) + args.max_tokens > args.max_model_len]
    if too_long:
        sys.exit(f"prompts {too_long[:5]} do not fit: raise --max-model-len or lower --max-tokens")
    levels = [int(x) for x in args.concurrency.split(",")]
    names = (["plain"] + [f"dspark-{p}" for p in args.policies.split(",") if p]
             + ([] if args.no_ngram else [ngram_name(int(k)) for k in args.ngram_tokens.split(",")]))
    rounds = []
    for i in range(args.repeats):
        # Every other round runs the engines in reverse order, so that a host whose speed
        # drifts over minutes (shared cores) biases no engine's ratio to plain one way.
        results, answers = [], {}
        for name in (names if i % 2 == 0 else names[::-1]):
            rows, got = asyncio.run(bench_engine(args, name, prompts, levels))
            results += rows
            answers[name] = got
        compare_to_plain(results, answers, args.temperature)
        rounds.append(results)
    results = combine_rounds(rounds)
    out = {"target": args.target, "draft": args.draft, "prompts": args.prompts, "num_prompts": len(prompts),
           "max_tokens": args.max_tokens, "temperature": args.temperature, "dtype": args.dtype,
           "calibration": args.calibration, "enforce_eager": args.enforce_eager, "host": host(),
           "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
           "greedy_outputs_identical": (all(r["identical_to_plain"] for r in results)
                                        if args.temperature == 0 else None),
           "results": results}
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    if args.plot:
        plot(out, args.plot)
    print(f"{'engine':16s}" + "".join(f"  c={c:<14d}" for c in levels))
    for name in names:
        rows = {r["concurrency"]: r for r in results if r["engine"] == name}
        print(f"{name:16s}" + "".join(f"  {rows[c]['ratio_to_plain']:5.2f}x "
                                      f"({rows[c]['ratio_range'][0]:.2f}-{rows[c]['ratio_range'][1]:.2f})"
                                      for c in levels))
    if not args.no_warmup:
        print("first pass (cold engine at that level), median ratio to plain's first pass:")
        for name in names:
            rows = {r["concurrency"]: r for r in results if r["engine"] == name}
            print(f"{name:16s}" + "".join(f"  {rows[c]['cold_ratio_to_plain']:5.2f}x{'':11s}" for c in levels))
    print("output tokens per engine step (median round; at c > 1 the batch's):")
    for name in names[1:]:
        rows = {r["concurrency"]: r for r in results if r["engine"] == name}
        print(f"{name:16s}" + "".join(f"  {rows[c].get('tokens_per_step') or float('nan'):6.2f}{'':10s}" for c in levels))
    print(f"wrote {args.json}; greedy outputs identical to plain: {out['greedy_outputs_identical']}")


if __name__ == "__main__":
    main()
