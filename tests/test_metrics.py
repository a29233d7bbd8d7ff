"""The plugin's counters on their way out: worker snapshot -> scheduler report -> Prometheus.

No engine: each stage is fed what the previous one produces, and the report
goes through vLLM's own engine-core serializer in between.
"""

from types import SimpleNamespace

import numpy as np
import pytest

from dspark_vllm.metrics import EngineStats, StatsReport


def worker_stats() -> EngineStats:
    stats = EngineStats("sync", 3)
    stats.record_step(num_drafting=2, num_positions=3, budget=5, seconds=0.01, profiled_seconds=0.008)
    stats.record_verification(np.array([2, 2, 1]), np.array([2, 1, 0]), np.array([1.8, 1.2, 0.4]))
    return stats


def test_engine_stats_count_steps_and_verifications():
    stats = worker_stats()
    stats.record_step(num_drafting=0, num_positions=3, budget=0, seconds=0.004, profiled_seconds=None)
    seen = stats.as_dict()
    assert seen["policy"] == "sync" and seen["steps"] == 2 and seen["drafting_steps"] == 1
    assert seen["skipped_fraction"] == 0.5
    assert seen["drafted"] == [2, 2, 2] and seen["verified"] == [2, 2, 1] and seen["accepted"] == [2, 1, 0]
    assert seen["budget_sum"] == 5 and seen["step_time_sum"] == pytest.approx(0.014)
    assert seen["calibration_error"] == pytest.approx((0.2 + 0.2 + 0.4) / 5)
    assert seen["temperature"] == [1.0, 1.0, 1.0]  # uncalibrated: confidences used as they are
    snapshot = stats.snapshot()
    assert all(type(x) is float for x in snapshot)  # no numpy scalars: vLLM's serializer refuses them
    np.testing.assert_array_equal(EngineStats.from_snapshot(snapshot).array, stats.array)


def test_reports_carry_increments_once_and_each_step_budget():
    stats, report = worker_stats(), StatsReport()
    assert report.take() is None  # nothing seen yet
    report.observe(stats.snapshot())
    first = report.take()
    assert first["counters"]["steps"] == 1 and first["counters"]["verified"] == [2, 2, 1]
    assert first["budgets"] == [5.0] and first["policy"] == "sync"

    # two steps before the next report (its stats went nowhere): nothing lost, nothing twice
    stats.record_step(num_drafting=1, num_positions=3, budget=3, seconds=0.01, profiled_seconds=None)
    report.observe(stats.snapshot())
    stats.record_step(num_drafting=1, num_positions=3, budget=7, seconds=0.01, profiled_seconds=None)
    stats.record_calibration(np.array([1.5, 1.0, 0.5]), 0.04, 2)
    report.observe(stats.snapshot())
    second = report.take()
    assert second["counters"]["steps"] == 2 and second["counters"]["drafted"] == [2, 2, 2]
    assert second["counters"]["verified"] == [0, 0, 0] and second["counters"]["refits"] == 2
    assert second["budgets"] == [3.0, 7.0]
    assert second["temperature"] == [1.5, 1.0, 0.5] and second["live_ece"] == 0.04
    assert report.take()["counters"]["steps"] == 0  # no new step: no increment

    # the worker restarted (its counters began again): the report starts over, never negative
    report.observe(EngineStats("sync", 3).snapshot())
    assert all(v >= 0 for v in report.take()["counters"]["drafted"])


def test_report_survives_vllms_serializer_and_reaches_the_registry():
    """Engine core -> front end as vLLM sends it, then through the stat logger into Prometheus."""
    from prometheus_client import REGISTRY
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from dspark_vllm.vllm_integration import DSparkStatLogger, attach_report

    stats, report = worker_stats(), StatsReport()
    report.observe(stats.snapshot())
    core = EngineCoreOutputs(scheduler_stats=SchedulerStats())
    attach_report(core.scheduler_stats, report.take())
    received = MsgpackDecoder(EngineCoreOutputs).decode(MsgpackEncoder().encode(core)).scheduler_stats

    config = SimpleNamespace(additional_config={"dspark": {"draft_model": "d", "verification": "sync"}},
                             speculative_config=SimpleNamespace(num_speculative_tokens=3))
    logger = DSparkStatLogger(config, [0])
    logger.log_engine_initialized()
    logger.record(received, None)
    assert received.kv_connector_stats is None  # vLLM's own loggers see no connector stats
    stats.record_step(num_drafting=1, num_positions=3, budget=2, seconds=0.5, profiled_seconds=None)
    report.observe(stats.snapshot())
    with_connector = SchedulerStats(kv_connector_stats={"connector": 1})
    attach_report(with_connector, report.take())
    logger.record(with_connector, None, engine_idx=0)
    assert with_connector.kv_connector_stats == {"connector": 1}  # a real connector's stats stay

    value = lambda name, **labels: REGISTRY.get_sample_value(name, labels)  # noqa: E731
    assert value("vllm:dspark_verified_tokens_total", position="2") == 2
    assert value("vllm:dspark_accepted_tokens_total", position="3") == 0
    assert value("vllm:dspark_drafted_tokens_total", position="1") == 3
    assert value("vllm:dspark_predicted_accepted_tokens_total", position="1") == pytest.approx(1.8)
    assert value("vllm:dspark_engine_steps_total") == 2 and value("vllm:dspark_drafting_steps_total") == 2
    assert value("vllm:dspark_step_time_seconds_total") == pytest.approx(0.51)
    assert value("vllm:dspark_verification_budget_tokens_count") == 2
    assert value("vllm:dspark_verification_budget_tokens_sum") == 7
    assert value("vllm:dspark_verification_budget_tokens_bucket", le="4.0") == 1
    assert value("vllm:dspark_policy_info", policy="sync") == 1
    assert value("vllm:dspark_calibration_error") == pytest.approx(stats.calibration_error())
    assert value("vllm:dspark_confidence_temperature", position="1") == 1.0

    # a second engine in this process: fresh metrics, no duplicate registration
    DSparkStatLogger(config, [0]).log_engine_initialized()
    assert value("vllm:dspark_engine_steps_total") == 0
