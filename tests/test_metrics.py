"""The plugin's counters in shared memory: what a step records is what a scrape reads."""

import numpy as np
import pytest

from dspark_vllm.metrics import DSparkCollector, EngineStats, read_stats


def test_steps_and_verifications_reach_the_reader(tmp_path):
    path = tmp_path / "stats.bin"
    stats = EngineStats("sync", 3, path)
    stats.record_step(num_drafting=2, num_positions=3, budget=5, seconds=0.01, profiled_seconds=0.008)
    stats.record_step(num_drafting=0, num_positions=3, budget=0, seconds=0.004, profiled_seconds=None)
    stats.record_verification(np.array([2, 2, 1]), np.array([2, 1, 0]), np.array([1.8, 1.2, 0.4]))

    seen = read_stats(path)  # another process would map the same file
    assert seen.policy_name == "sync"
    assert seen.steps[0] == 2 and seen.drafting_steps[0] == 1 and seen.skipped_fraction() == 0.5
    assert seen.drafted.tolist() == [2, 2, 2] and seen.verified.tolist() == [2, 2, 1]
    assert seen.accepted.tolist() == [2, 1, 0]
    assert seen.budget_sum[0] == 5 and seen.step_time_sum[0] == pytest.approx(0.014)
    # budget 5 falls in the buckets <= 8 and above: cumulative
    assert seen.budget_buckets.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    assert seen.calibration_error() == pytest.approx((0.2 + 0.2 + 0.4) / 5)
    assert seen.seq[0] % 2 == 0  # no write in progress


def test_a_snapshot_taken_during_a_write_is_retried_not_returned(tmp_path):
    path = tmp_path / "stats.bin"
    stats = EngineStats("fixed", 2, path)
    stats._begin()  # a step is writing
    assert read_stats(path, retries=3) is None
    stats._end()
    assert read_stats(path) is not None


def test_collector_exports_the_counters(tmp_path):
    path = tmp_path / "stats.bin"
    stats = EngineStats("async", 2, path)
    stats.record_step(num_drafting=1, num_positions=2, budget=2, seconds=0.01, profiled_seconds=None)
    stats.record_verification(np.array([1, 1]), np.array([1, 0]), None)
    collector = DSparkCollector()
    collector.point_at(str(path))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in collector.collect() for s in family.samples}
    assert samples[("vllm:dspark_verified_tokens_total", (("position", "2"),))] == 1
    assert samples[("vllm:dspark_accepted_tokens_total", (("position", "2"),))] == 0
    assert samples[("vllm:dspark_policy_info", (("policy", "async"),))] == 1
    assert samples[("vllm:dspark_engine_steps_total", ())] == 1
    assert samples[("vllm:dspark_verification_budget_tokens_count", ())] == 1
    assert read_stats(tmp_path / "missing.bin") is None
