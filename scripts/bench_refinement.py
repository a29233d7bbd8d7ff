"""Online STS refinement on traffic unlike the calibration set, off vs on, in one run.

    python scripts/bench_refinement.py --target T --draft D --calibration CAL.json \
        --prompts ../shared/datasets/mt-bench.jsonl --raw --json OUT.json [--plot OUT.png]
        [--concurrency 16] [--passes 3] [--every 256] [--window 4096]

Two engines, `sync` policy, the same offline calibration: one keeps it, one
refines it while serving (`refinement={every, window}`). Each serves the
prompts `--passes` times at concurrency c. Per pass:

  output_tokens_per_s   generated tokens / wall time
  calibration_error     sum_k |predicted_k - accepted_k| / verified tokens of the pass
                        (predicted = the calibrated survival of verified slots)
  predicted_rate, accepted_rate   per position, per verified slot

and for the refining engine the temperatures and the window's ECE at the end.
The model's own dtype (bf16 for the default pair).
"""

import argparse
import asyncio
import gc
import json
import os

import numpy as np

from bench_speed import load_prompts, pair_arguments, run_level  # scripts/ is on sys.path when run as a script


def parse_args(argv=None):
    ap = pair_arguments(argparse.ArgumentParser(description=__doc__,
                                                formatter_class=argparse.RawDescriptionHelpFormatter), 80)
    ap.add_argument("--calibration", required=True, help="offline STS calibration (fitted on other prompts)")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--every", type=int, default=256)
    ap.add_argument("--window", type=int, default=4096)
    return ap.parse_args(argv)


async def counters(engine) -> dict:
    """The plugin's counters, exact, from the engine's driver worker."""
    s = (await engine.collective_rpc("dspark_stats"))[0]
    return {"verified": np.array(s["verified"]), "accepted": np.array(s["accepted"]),
            "predicted": np.array(s["predicted"]), "temperature": np.array(s["temperature"]),
            "live_ece": s["live_ece"], "refits": s["refits"]}


async def serve(args, prompts, refinement):
    import dspark_vllm
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    extra = {"refinement": {"every": args.every, "window": args.window}} if refinement else {}
    kwargs = dspark_vllm.engine_kwargs(args.draft, verification="sync", calibration=args.calibration, **extra)
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=args.target, max_model_len=args.max_model_len, enforce_eager=True, seed=0,
        max_num_seqs=args.concurrency, **kwargs))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    rows = []
    try:
        await run_level(engine, prompts[:2], 2, params)  # warm-up
        for p in range(args.passes):
            before = await counters(engine)
            got, wall = await run_level(engine, prompts, args.concurrency, params)
            after = await counters(engine)
            d = {k: after[k] - before[k] for k in ("verified", "accepted", "predicted")}
            v = np.maximum(d["verified"], 1)
            row = {"refinement": refinement, "pass": p + 1,
                   "output_tokens_per_s": sum(len(t) for t in got.values()) / wall,
                   "calibration_error": float(np.abs(d["predicted"] - d["accepted"]).sum() / v.sum()),
                   "predicted_rate": (d["predicted"] / v).round(4).tolist(),
                   "accepted_rate": (d["accepted"] / v).round(4).tolist(),
                   "temperatures": after["temperature"].round(4).tolist(),
                   "live_ece": after["live_ece"] if refinement else None, "refits": after["refits"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        engine.shutdown()
        del engine
        gc.collect()
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    last = {r["refinement"]: r for r in rows}  # the last pass of each engine
    k = np.arange(1, len(last[False]["accepted_rate"]) + 1)
    ax.plot(k, last[False]["accepted_rate"], "k-o", label="observed")
    ax.plot(k, last[False]["predicted_rate"], "--s", label=f"predicted, offline (err {last[False]['calibration_error']:.3f})")
    ax.plot(k, last[True]["predicted_rate"], "--^", label=f"predicted, refined (err {last[True]['calibration_error']:.3f})")
    ax.set_xlabel("draft position")
    ax.set_ylabel("survival per verified slot")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    prompts = load_prompts(args.target, args.prompts, args.num_prompts, args.raw)
    prompts = [p[-(args.max_model_len - args.max_tokens):] for p in prompts]
    rows = []
    for refinement in (False, True):
        rows += asyncio.run(serve(args, prompts, refinement))
    last = {r["refinement"]: r for r in rows}
    out = {"target": args.target, "draft": args.draft, "calibration": args.calibration, "prompts": args.prompts,
           "concurrency": args.concurrency, "every": args.every, "window": args.window, "results": rows,
           "throughput_ratio_on_vs_off": last[True]["output_tokens_per_s"] / last[False]["output_tokens_per_s"]}
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    if args.plot:
        plot(rows, args.plot)
    print(f"last pass: calibration error {last[False]['calibration_error']:.4f} (off) vs "
          f"{last[True]['calibration_error']:.4f} (on); throughput on/off {out['throughput_ratio_on_vs_off']:.3f}")


if __name__ == "__main__":
    main()
