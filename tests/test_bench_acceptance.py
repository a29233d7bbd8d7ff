"""scripts/bench_acceptance.py end to end on the tiny fixtures (two real vLLM engines)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_acceptance(fixture_paths, tmp_path):
    fx = fixture_paths
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"turns": [f"Write a Python function number {i}.", "Now test it."]})
                               + "\n" for i in range(6)))
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_acceptance.py"),
                    "--target", fx["target"], "--draft", fx["dspark"], "--prompts", str(prompts),
                    "--num-prompts", "4", "--max-tokens", "24", "--json", str(out), "--plot", str(png)],
                   check=True, timeout=900)  # conftest sets VLLM_CPU_KVCACHE_SPACE

    r = json.loads(out.read_text())
    assert {"target", "draft", "prompts", "num_prompts", "max_tokens", "temperature",
            "num_speculative_tokens", "verification", "mean_accepted_length", "draft_acceptance_rate",
            "per_position_conditional_acceptance", "per_position_acceptance",
            "baseline_output_tokens_per_s", "dspark_output_tokens_per_s", "speedup",
            "greedy_outputs_identical"} <= r.keys()
    k = r["num_speculative_tokens"]
    assert r["num_prompts"] == 4 and k == 7 and r["verification"] == "fixed"
    assert r["num_drafts"] > 0 and r["num_draft_tokens"] <= k * r["num_drafts"]
    assert 1.0 <= r["mean_accepted_length"] <= 1 + k
    assert 0.0 <= r["draft_acceptance_rate"] <= 1.0
    assert len(r["per_position_acceptance"]) == len(r["per_position_conditional_acceptance"]) == k
    pos = r["per_position_acceptance"]
    assert all(0.0 <= a <= 1.0 for a in pos) and pos == sorted(pos, reverse=True)
    assert all(c is None or 0.0 <= c <= 1.0 for c in r["per_position_conditional_acceptance"])
    assert r["mean_accepted_length"] == pytest.approx(1 + sum(pos))
    assert r["baseline_output_tokens_per_s"] > 0 and r["dspark_output_tokens_per_s"] > 0
    assert r["speedup"] == pytest.approx(r["dspark_output_tokens_per_s"] / r["baseline_output_tokens_per_s"])
    assert isinstance(r["greedy_outputs_identical"], bool)
    assert png.stat().st_size > 0
