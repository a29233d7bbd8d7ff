"""The confidence-scheduled policies (sync = Algorithm 1, async = section 5.2) in a real engine.

Exactness end to end (greedy equality, sampled distribution), calibration and
a cost profile read at serve time, the per-position metrics, and the policies'
response to load under a steep cost curve.
"""

import json

import pytest

from dspark_vllm.sps import synthetic_profile
from stats import ALPHA, sequence_gof_pvalue
from engine_utils import COMMON, exact_conditionals, generate_ids

pytestmark = pytest.mark.slow

BLOCK = 7


@pytest.fixture(scope="module")
def serve_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_files")
    steep = synthetic_profile("steep", 4096).save(d / "steep.json")
    cal = d / "calibration.json"
    cal.write_text(json.dumps({"version": 1, "block_size": BLOCK,
                               "temperatures": [1.5, 1.0, 0.8, 1.2, 1.0, 2.0, 1.0]}))
    # A version-2 map (calibration.map_logits): a piecewise shape, a bias and a temperature per position.
    cal2 = d / "calibration-v2.json"
    cal2.write_text(json.dumps({"version": 2, "block_size": BLOCK, "temperatures": [0.5, 0.6, 0.4, 0.5, 0.7, 0.5, 0.4],
                                "biases": [-1.0, -1.5, -0.5, -1.8, 0.5, -1.0, 0.0],
                                "knots": [[-0.5, 0.0, 0.5]] * BLOCK,
                                "slopes": [[0.3, 2.0, 0.5, 3.0], [1.0, 1.0, 4.0, 0.2]] * 3 + [[1.0] * 4]}))
    return {"steep": str(steep), "calibration": str(cal), "calibration_v2": str(cal2), "dir": d}


def make_llm(fixture_paths, serve_files, verification, **extra):
    import dspark_vllm
    from vllm import LLM

    # The break-even guard would skip this random drafter on a steep curve
    # (tests/test_guard.py); here the policies themselves are under test.
    kwargs = dspark_vllm.engine_kwargs(fixture_paths["dspark"], verification=verification,
                                       calibration=serve_files["calibration"],
                                       sps_profile=serve_files["steep"], break_even=False)
    return LLM(model=fixture_paths["target"], **kwargs, **COMMON,
               per_request_spec_decode_metrics="detailed", **extra)


@pytest.fixture(scope="module", params=["sync", "async"])
def scheduled(request, fixture_paths, serve_files):
    llm = make_llm(fixture_paths, serve_files, request.param)
    yield request.param, llm
    del llm


def dspark_metrics(llm) -> dict:
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:dspark_"):
            key = m.name if not m.labels else f"{m.name}[{m.labels.get('position', m.labels.get('policy'))}]"
            out[key] = getattr(m, "value", None)
    return out


def test_greedy_equals_plain_decoding_and_lengths_vary(scheduled, baseline, prompts):
    from vllm import SamplingParams

    policy, llm = scheduled
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [tuple(o.outputs[0].token_ids) for o in outs] == generate_ids(baseline, prompts, params)
    steps = [x for o in outs for x in (o.outputs[0].spec_decode_metrics.per_step_drafted or [])]
    assert len(set(steps)) > 1, steps  # the scheduler chose different lengths

    [info] = llm.collective_rpc("dspark_info")
    assert info["policy"] == policy and info["calibrated"]
    assert info["sps_profile"]["model"] == "synthetic-steep"
    m = dspark_metrics(llm)
    assert m[f"vllm:dspark_policy_info[{policy}]"] == 1
    verified = sum(m[f"vllm:dspark_verified_tokens[{k}]"] for k in range(1, BLOCK + 1))
    drafted = sum(m[f"vllm:dspark_drafted_tokens[{k}]"] for k in range(1, BLOCK + 1))
    accepted = sum(m[f"vllm:dspark_accepted_tokens[{k}]"] for k in range(1, BLOCK + 1))
    assert drafted > verified > accepted >= 0
    assert m["vllm:dspark_drafted_tokens[1]"] >= m["vllm:dspark_verified_tokens[1]"]
    # llm.get_metrics() truncates counters to ints (seconds < 1 read 0): read the engine's own counters
    [stats] = llm.collective_rpc("dspark_stats")
    assert stats["profiled_step_time_sum"] > 0 and stats["step_time_sum"] > 0
    # every step's increments reached the front end, once
    assert m["vllm:dspark_engine_steps"] == stats["steps"]
    assert m["vllm:dspark_drafted_tokens[1]"] == stats["drafted"][0]
    predicted = [m[f"vllm:dspark_predicted_accepted_tokens[{k}]"] for k in range(1, BLOCK + 1)]
    per_pos = [m[f"vllm:dspark_accepted_tokens[{k}]"] for k in range(1, BLOCK + 1)]
    assert sum(predicted) > 0
    # llm.get_metrics() reports counters as ints: each predicted sum may lose < 1
    assert m["vllm:dspark_calibration_error"] == pytest.approx(
        sum(abs(p - a) for p, a in zip(predicted, per_pos)) / verified, abs=BLOCK / verified)


def test_sampling_matches_target_distribution(scheduled, fixture_paths, prompts):
    from vllm import SamplingParams

    _, llm = scheduled
    n, prompt = 3000, prompts[5]
    params = SamplingParams(temperature=2.0, max_tokens=4, ignore_eos=True)
    samples = generate_ids(llm, [prompt] * n, params)
    cond = exact_conditionals(fixture_paths["target"], prompt, temperature=2.0)
    assert sequence_gof_pvalue(samples, cond) > ALPHA


def test_steep_cost_curve_verifies_less_under_load(scheduled, prompts):
    """Alone a request gets long verification; 24 at once share a smaller budget each."""
    from vllm import SamplingParams

    _, llm = scheduled
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)

    def mean_len(batch):
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        steps = [x for o in outs for x in (o.outputs[0].spec_decode_metrics.per_step_drafted or [])[2:]]
        return sum(steps) / len(steps)

    alone = mean_len(prompts[:1])
    crowded = mean_len(prompts)
    assert crowded < alone, (alone, crowded)


def test_bad_calibration_and_profile_files_fail_clearly(fixture_paths, serve_files, tmp_path):
    import dspark_vllm
    from vllm import LLM

    wrong_block = tmp_path / "cal5.json"
    wrong_block.write_text(json.dumps({"version": 1, "block_size": 5, "temperatures": [1.0] * 5}))
    # vLLM wraps errors raised while it builds its config; the message is ours.
    with pytest.raises(Exception, match="is for block_size 5 but the draft checkpoint has block_size 7"):
        LLM(model=fixture_paths["target"], **COMMON,
            **dspark_vllm.engine_kwargs(fixture_paths["dspark"], verification="sync",
                                        calibration=str(wrong_block)))
    bad_profile = tmp_path / "sps.json"
    bad_profile.write_text(json.dumps({"version": 2, "model": "m", "hardware": "h", "settings_key": "k",
                                       "created": "now", "table": [{"tokens": 4, "sps": -1.0}]}))
    with pytest.raises(Exception, match=r"table\[0\]\.sps must be > 0"):
        LLM(model=fixture_paths["target"], **COMMON,
            **dspark_vllm.engine_kwargs(fixture_paths["dspark"], verification="sync",
                                        sps_profile=str(bad_profile)))


def _round_survival_and_logits(worker):
    """Runs inside the worker: the recent rounds' calibrated survival and raw confidence
    logits, as lists (vLLM's result channel does not carry numpy arrays as such)."""
    rounds = [r for r in worker.model_runner.drafter.recent_rounds if r.survival is not None]
    return ([row for r in rounds for row in r.survival.tolist()],
            [row for r in rounds for row in r.confidence_logits.float().cpu().tolist()])


def test_version_2_calibration_is_the_map_the_engine_applies(fixture_paths, serve_files, baseline, prompts,
                                                              monkeypatch):
    """The engine's survival estimates are the file's full map (temperatures, low temperatures
    and biases), not its temperatures alone; greedy output still equals plain decoding."""
    import numpy as np
    from vllm import SamplingParams

    from dspark_vllm.calibration import cumulative_survival, load_calibration

    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with a function
    serve_files = dict(serve_files, calibration=serve_files["calibration_v2"])
    llm = make_llm(fixture_paths, serve_files, "sync")
    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    assert generate_ids(llm, prompts, greedy) == generate_ids(baseline, prompts, greedy)
    [(survival, logits)] = llm.collective_rpc(_round_survival_and_logits)
    survival, logits = np.asarray(survival), np.asarray(logits)
    maps = load_calibration(serve_files["calibration"]).maps
    assert len(survival) > 10
    np.testing.assert_allclose(survival, cumulative_survival(logits, **maps), rtol=1e-4, atol=1e-6)
    assert np.abs(survival - cumulative_survival(logits, maps["temperatures"])).max() > 0.05
    [info] = llm.collective_rpc("dspark_info")
    assert info["calibrated"]
    del llm


def test_online_refinement_stays_exact_and_reports(fixture_paths, serve_files, baseline, prompts):
    """`sync` with online STS refinement re-fitting every 32 rounds: greedy output equals plain
    decoding, sampled output has the target's distribution, and /metrics shows the re-fits,
    the temperatures in use and the live ECE. It refines a version-2 (piecewise) offline map."""
    from vllm import SamplingParams

    import dspark_vllm
    from vllm import LLM

    kwargs = dspark_vllm.engine_kwargs(fixture_paths["dspark"], verification="sync",
                                       calibration=serve_files["calibration_v2"], sps_profile=serve_files["steep"],
                                       break_even=False, refinement={"every": 32, "window": 256})
    llm = LLM(model=fixture_paths["target"], **kwargs, **COMMON)
    greedy = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    assert generate_ids(llm, prompts, greedy) == generate_ids(baseline, prompts, greedy)
    n, prompt = 3000, prompts[5]
    samples = generate_ids(llm, [prompt] * n, SamplingParams(temperature=2.0, max_tokens=4, ignore_eos=True))
    cond = exact_conditionals(fixture_paths["target"], prompt, temperature=2.0)
    assert sequence_gof_pvalue(samples, cond) > ALPHA

    [stats] = llm.collective_rpc("dspark_stats")
    assert stats["refits"] > 10 and 0 <= stats["live_ece"] < 1
    offline = [0.5, 0.6, 0.4, 0.5, 0.7, 0.5, 0.4]  # refinement scales the version-2 file's map
    assert stats["temperature"] != offline and all(t > 0 for t in stats["temperature"])
    m = dspark_metrics(llm)
    assert m["vllm:dspark_calibration_refits"] == stats["refits"]
    assert m["vllm:dspark_confidence_temperature[1]"] == pytest.approx(stats["temperature"][0])
    assert m["vllm:dspark_live_calibration_ece"] == pytest.approx(stats["live_ece"])
