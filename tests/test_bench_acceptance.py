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


@pytest.mark.slow
def test_bench_concurrency(fixture_paths, tmp_path):
    from dspark_vllm.sps import synthetic_profile

    fx = fixture_paths
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"turns": [f"def function_{i}(x):"]}) + "\n" for i in range(6)))
    profile = synthetic_profile("steep", 4096).save(tmp_path / "steep.json")
    out, png = tmp_path / "conc.json", tmp_path / "conc.png"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_concurrency.py"),
                    "--target", fx["target"], "--draft", fx["dspark"], "--prompts", str(prompts),
                    "--concurrency", "1,4", "--policies", "fixed,sync", "--requests-per-client", "2",
                    "--max-tokens", "16", "--raw", "--sps-profile", str(profile),
                    "--json", str(out), "--plot", str(png)], check=True, timeout=900)
    r = json.loads(out.read_text())
    rows = {(x["policy"], x["concurrency"]): x for x in r["results"]}
    assert set(rows) == {("fixed", 1), ("fixed", 4), ("sync", 1), ("sync", 4)}
    for x in rows.values():
        assert x["output_tokens_per_s"] > 0 and x["per_request_tokens_per_s"] > 0
        assert 1.0 <= x["mean_accepted_len"] <= 8.0
    # fixed verifies whole blocks (vLLM trims the last ones to max_tokens); on a
    # steep cost curve Algorithm 1 verifies less.
    assert rows[("fixed", 1)]["mean_verify_len"] > 6.0
    assert rows[("sync", 4)]["mean_verify_len"] < rows[("fixed", 4)]["mean_verify_len"]
    assert r["outputs_identical"] is True
    assert png.stat().st_size > 0
