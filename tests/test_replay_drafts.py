"""scripts/replay_drafts.py: prompt lookup as vLLM's n-gram method proposes, the replay
walk, and the script end to end on the tiny fixtures (no engine)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("replay_drafts", ROOT / "scripts" / "replay_drafts.py")
replay_drafts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(replay_drafts)


def test_prompt_lookup_takes_the_longest_suffix_match_at_its_earliest_occurrence():
    lookup = replay_drafts.prompt_lookup
    t = np.array([5, 1, 2, 7, 1, 2, 8, 1, 2])
    assert lookup(t, 2, 4, 3).tolist() == [7, 1, 2]  # [1, 2] occurs at 1 and 4: the earliest wins
    t = np.array([1, 2, 3, 9, 6, 2, 3, 4, 1, 2, 3])
    assert lookup(t, 2, 4, 2).tolist() == [9, 6]  # [1, 2, 3] (n=3) beats the later [2, 3]
    assert lookup(t, 2, 2, 2).tolist() == [9, 6]  # n capped at 2: [2, 3] earliest at 1
    assert lookup(np.array([1, 2, 3, 4]), 2, 4, 3).size == 0  # no repeat: no proposal
    assert lookup(np.array([4, 4, 4]), 2, 4, 5).tolist() == [4]  # overlapping match, cut at the end
    # The same proposals as vLLM's own n-gram search, where vLLM has it.
    vllm_ngram = pytest.importorskip("vllm.v1.spec_decode.ngram_proposer")
    rng = np.random.default_rng(0)
    for _ in range(200):
        t = rng.integers(0, 4, size=int(rng.integers(2, 40))).astype(np.int32)
        ours = lookup(t, 2, 4, 5)
        theirs = vllm_ngram._find_longest_matched_ngram_and_propose_tokens(t, 2, 4, 1024, 5)
        assert ours.tolist() == theirs.tolist(), t


def test_replay_walks_one_step_per_verified_block():
    # offset 0 accepts 6 drafts (7 tokens), offsets 7.. accept none, the last step is capped
    tokens, steps = replay_drafts.replay(np.array([6, 0, 0, 0, 0, 0, 0, 0, 5, 0]))
    assert (tokens, steps) == (10, 3)  # 0 -> 7, 7 -> 8, 8 -> 10 (5 accepted, capped at the 2 left)
    assert replay_drafts.replay(np.zeros(4, dtype=int)) == (4, 4)


@pytest.mark.slow
def test_replay_drafts_end_to_end(fixture_paths, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"turns": [f"def function_{i}(x): return x + x + x"]}) + "\n"
                               for i in range(3)))
    out = tmp_path / "replay.json"
    replay_drafts.main(["--target", fixture_paths["target"], "--draft", fixture_paths["dspark"],
                        "--prompts", str(prompts), "--raw", "--max-tokens", "12", "--json", str(out)])
    r = json.loads(out.read_text())
    per_step = r["tokens_per_step"]
    assert r["num_prompts"] == 3 and r["block_size"] == 7
    assert all(1.0 <= v <= 8.0 for v in per_step.values())
    assert per_step["oracle"] >= max(per_step["dspark"], per_step["ngram"], per_step["dspark_with_lookup"])
    assert 0.0 <= r["ngram_match_rate"] <= 1.0
    q = r["per_request"]["dspark_tokens_per_step"]
    assert q["min"] <= q["quartiles"][0] <= q["quartiles"][1] <= q["quartiles"][2] <= q["max"]
    steps = r["per_request"]["steps"]
    assert steps["min"] <= steps["mean"] <= steps["max"] <= 12
    # --lookup-tokens: lookup's blocks may run past the drafter's; the other sources stay as they were
    longer = tmp_path / "replay-12.json"
    replay_drafts.main(["--target", fixture_paths["target"], "--draft", fixture_paths["dspark"],
                        "--prompts", str(prompts), "--raw", "--max-tokens", "12", "--json", str(longer),
                        "--lookup-tokens", "12"])
    r12 = json.loads(longer.read_text())
    assert r["lookup_tokens"] == 7 and r12["lookup_tokens"] == 12
    assert {s: r12["tokens_per_step"][s] for s in ("dspark", "ngram", "oracle")} == {
        s: per_step[s] for s in ("dspark", "ngram", "oracle")}
    assert 1.0 <= r12["tokens_per_step"]["dspark_with_lookup"] <= 13.0
