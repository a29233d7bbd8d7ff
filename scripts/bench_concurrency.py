"""Throughput of the DSpark verification policies under load.

    python scripts/bench_concurrency.py --target T --draft D --prompts FILE.jsonl \
        --concurrency 1,4,16,64 --policies fixed,sync,async --json OUT.json [--plot OUT.png] \
        [--calibration CAL.json] [--requests-per-client 4] [--max-tokens 64] [--raw]

For each policy one vLLM engine (AsyncLLM, in this process) with the plugin
serves the same prompts; for each concurrency c, c clients each send requests
one after another (prompts taken round-robin) and the run is timed from the
first request to the last answer. Reported per (policy, concurrency):

  output_tokens_per_s       all generated tokens / wall time
  per_request_tokens_per_s  mean over requests of tokens / (finish - send)
  mean_verify_len           draft tokens verified per drafting round (policy's choice)
  mean_accepted_len         tokens emitted per drafting round, bonus included (tau)

The last two come from the plugin's own counters (the same ones as /metrics).
Greedy decoding (temperature 0) by default, so every policy must produce the
same text; the script checks that and records it as `outputs_identical`.
"""

import argparse
import asyncio
import gc
import json
import os
import sys
import time
import uuid


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--prompts", required=True, help='JSONL of {"turns": [...]}')
    ap.add_argument("--json", required=True)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--policies", default="fixed,sync,async")
    ap.add_argument("--calibration", default=None, help="STS calibration JSON for the policies")
    ap.add_argument("--sps-profile", default=None, help="engine cost table instead of profiling")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--raw", action="store_true", help="prompts are raw text (base/code model)")
    ap.add_argument("--dtype", default="float32")
    return ap.parse_args(argv)


async def run_load(engine, prompts, concurrency, per_client, params):
    """c clients, each sending per_client requests back to back; returns per-request records."""
    records = []

    async def client(c):
        for j in range(per_client):
            ids = prompts[(c * per_client + j) % len(prompts)]
            sent, final = time.perf_counter(), None
            async for out in engine.generate({"prompt_token_ids": ids}, params, request_id=uuid.uuid4().hex):
                final = out
            tokens = list(final.outputs[0].token_ids)
            records.append({"prompt": (c * per_client + j) % len(prompts), "tokens": tokens,
                            "seconds": time.perf_counter() - sent})

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    return records, time.perf_counter() - start


def counters(engine_stats_path):
    from dspark_vllm.metrics import read_stats

    s = read_stats(engine_stats_path)
    rounds = s.drafted[0] if s else 0
    return {"rounds": rounds, "verified": sum(s.verified) if s else 0, "accepted": sum(s.accepted) if s else 0}


async def bench_policy(args, policy, prompts, levels):
    import dspark_vllm
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    options = {k: v for k, v in (("calibration", args.calibration), ("sps_profile", args.sps_profile))
               if v is not None}
    kwargs = dspark_vllm.engine_kwargs(args.draft, verification=policy, **options)
    metrics_path = os.path.join(os.path.dirname(os.path.abspath(args.json)),
                                f".bench-metrics-{policy}-{os.getpid()}.json")
    kwargs["additional_config"]["dspark"]["metrics_path"] = metrics_path
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=args.target, dtype=args.dtype, max_model_len=args.max_model_len, enforce_eager=True,
        max_num_seqs=max(levels), seed=0, **kwargs))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, ignore_eos=True)
    rows, texts = [], {}
    try:
        await run_load(engine, prompts, 1, 1, params)  # warm-up
        for c in levels:
            before = counters(metrics_path)
            records, wall = await run_load(engine, prompts, c, args.requests_per_client, params)
            after = counters(metrics_path)
            rounds = max(after["rounds"] - before["rounds"], 1)
            total = sum(len(r["tokens"]) for r in records)
            rows.append({
                "policy": policy, "concurrency": c,
                "output_tokens_per_s": total / wall,
                "per_request_tokens_per_s": sum(len(r["tokens"]) / r["seconds"] for r in records) / len(records),
                "mean_verify_len": (after["verified"] - before["verified"]) / rounds,
                "mean_accepted_len": 1 + (after["accepted"] - before["accepted"]) / rounds,
                "requests": len(records), "wall_s": wall,
            })
            texts.update({r["prompt"]: r["tokens"] for r in records})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        if os.path.exists(metrics_path):
            os.remove(metrics_path)
    return rows, texts


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for policy in dict.fromkeys(r["policy"] for r in results):
        rs = [r for r in results if r["policy"] == policy]
        xs = [r["concurrency"] for r in rs]
        axes[0].plot(xs, [r["output_tokens_per_s"] for r in rs], marker="o", label=policy)
        axes[1].plot(xs, [r["mean_verify_len"] for r in rs], marker="o", label=policy)
    for ax, title in zip(axes, ["output tokens/s", "mean verification length"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from transformers import AutoTokenizer

    from dspark_vllm.prompts import load_turns, prompt_token_ids

    tok = AutoTokenizer.from_pretrained(args.target)
    prompts = [prompt_token_ids(tok, t, args.raw) for t in load_turns(args.prompts, args.num_prompts)]
    too_long = [i for i, p in enumerate(prompts) if len(p) + args.max_tokens > args.max_model_len]
    if too_long:
        sys.exit(f"prompts {too_long[:5]} do not fit: raise --max-model-len or lower --max-tokens")
    levels = [int(x) for x in args.concurrency.split(",")]
    results, outputs = [], {}
    for policy in args.policies.split(","):
        rows, texts = asyncio.run(bench_policy(args, policy, prompts, levels))
        results += rows
        outputs[policy] = texts
    first = next(iter(outputs.values()))
    identical = all(texts == first for texts in outputs.values()) if args.temperature == 0 else None
    out = {"target": args.target, "draft": args.draft, "prompts": args.prompts,
           "max_tokens": args.max_tokens, "temperature": args.temperature,
           "calibration": args.calibration, "outputs_identical": identical, "results": results}
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    if args.plot:
        plot(results, args.plot)
    print(f"wrote {args.json}; outputs identical across policies: {identical}")


if __name__ == "__main__":
    main()
