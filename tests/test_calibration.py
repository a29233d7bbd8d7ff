"""Sequential Temperature Scaling, its metrics, the calibration file and scripts/calibrate.py."""

import json
import re
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dspark_vllm.calibration import (apply_temperatures, auc, calibrated_logits, calibration_from_fit,
                                     cumulative_survival, ece, evaluate_calibration, fit_sts,
                                     heldout_report, load_calibration, reliability_bins,
                                     save_calibration, scaled_maps, sigmoid)
from dspark_vllm.model.config import DSparkConfigError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "calibrate.py"


# -- metrics -------------------------------------------------------------------
def test_ece_is_zero_for_calibrated_and_the_gap_for_a_constant():
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    assert ece(p, rng.random(p.size) < p) < 0.01
    y = np.r_[np.ones(500), np.zeros(500)]
    assert ece(np.full(1000, 0.8), y) == pytest.approx(0.3)
    assert ece(y, y) == 0.0


def test_auc_known_cases_and_ties():
    assert auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == pytest.approx(3.5 / 4)  # one tie = 1/2
    assert auc(np.full(10, 0.3), np.arange(10) % 2) == pytest.approx(0.5)
    assert math.isnan(auc([0.1, 0.2], [1, 1]))


def test_auc_matches_pairwise_definition_and_soft_labels_count_as_weights():
    rng = np.random.default_rng(1)
    p = rng.integers(0, 8, 300) / 8.0  # many ties
    y = (rng.random(300) < p).astype(float)
    pos, neg = p[y == 1], p[y == 0]
    pairwise = ((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean()
    assert auc(p, y) == pytest.approx(pairwise)
    # Soft outcome y: weight y positive, 1 - y negative, never paired with itself.
    # The half-positive at 0.6 beats the negative at 0.2 and loses to the positive at 0.9.
    assert auc([0.2, 0.6, 0.9], [0.0, 0.5, 1.0]) == pytest.approx(1.0)
    assert auc([0.2, 0.6, 0.9], [1.0, 0.5, 0.0]) == pytest.approx(0.0)


def test_reliability_bins():
    b = reliability_bins([0.05, 0.07, 0.95, 1.0], [0, 1, 1, 1], bins=10)
    assert b.count.tolist() == [2, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    assert b.mean_pred[0] == pytest.approx(0.06) and b.mean_outcome[0] == pytest.approx(0.5)
    assert math.isnan(b.mean_pred[1])


# -- STS -------------------------------------------------------------------------
def synthetic_rounds(n=20_000, seed=0, shift=0.0):
    """True conditional survival p_k; the head reports logit(p_k) * T_k (miscalibrated).

    shift moves the true acceptance logit away from what the head sees (another
    domain: the same confidences, drafts accepted less often when shift < 0).
    """
    rng = np.random.default_rng(seed)
    true_t = np.array([0.5, 0.7, 1.5, 0.6, 2.0, 0.8, 1.2])
    logit_p = np.linspace(2.5, 1.0, 7) + rng.normal(0, 1.5, (n, 7))
    accepted = rng.random((n, 7)) < sigmoid(logit_p + shift)
    return logit_p * true_t, np.cumprod(accepted, axis=1).astype(float), true_t


def test_sts_recovers_known_miscalibration():
    z, survival, true_t = synthetic_rounds()
    r = fit_sts(z, survival, form="temperature")  # the paper's form: the temperatures themselves
    assert max(r.ece_after) < 0.02
    assert all(a < 0.5 * b for a, b in zip(r.ece_after, r.ece_before))
    np.testing.assert_allclose(r.temperatures, true_t, rtol=0.2)
    # The default piecewise form finds the same straight line (its slopes are loosely
    # identified where the sigmoid saturates; the probabilities are what counts).
    pw = fit_sts(z, survival)
    assert max(pw.ece_after) < 0.02
    assert np.abs(sigmoid(calibrated_logits(z, **pw.maps)) - sigmoid(z / true_t)).mean(0).max() < 0.02
    # Position 1 is a monotone map of z_1: AUC identical. Later positions
    # rescale several logits differently, so the product's ranking may move a little.
    assert r.auc_after[0] == pytest.approx(r.auc_before[0], abs=1e-12)
    np.testing.assert_allclose(r.auc_after, r.auc_before, atol=0.01)
    # Per slot (given the prefix survived), temperature scaling never changes the ranking.
    c_all = sigmoid(calibrated_logits(z, **r.maps))
    for k in range(1, 7):
        rows = survival[:, k - 1] == 1
        c = c_all[rows, k]
        assert auc(c, survival[rows, k]) == pytest.approx(auc(z[rows, k], survival[rows, k]), abs=1e-12)
    assert r.num_samples == [len(z)] * 7


def test_sts_ignores_unobserved_entries_and_leaves_calibrated_logits_alone():
    z, survival, true_t = synthetic_rounds(n=20_000, seed=3)
    z = z / true_t  # already calibrated
    observed = np.ones_like(survival, dtype=bool)
    observed[:5000, 4:] = False
    survival[:5000, 4:] = 1.0  # garbage where unobserved
    r = fit_sts(z, survival, observed)
    np.testing.assert_allclose(r.temperatures, 1.0, rtol=0.25)
    assert r.num_samples[4:] == [15_000] * 3 and max(r.ece_after) < 0.02
    assert fit_sts(z, survival).ece_before[4] > 0.1  # the garbage would have counted


def test_held_out_evaluation_recovers_the_miscalibration_and_shows_a_shift():
    """Fitted on one set, measured on another: small ECE when both come from the same
    miscalibration, clearly larger when the evaluation set is shifted."""
    z, survival, _ = synthetic_rounds(seed=0)
    fit = fit_sts(z, survival)
    z_same, s_same, _ = synthetic_rounds(seed=1)
    same = evaluate_calibration(z_same, s_same, **fit.maps)
    assert max(same.ece_after) < 0.02 and np.mean(same.ece_before) > 5 * np.mean(same.ece_after)
    z_shift, s_shift, _ = synthetic_rounds(seed=2, shift=-1.0)
    shifted = evaluate_calibration(z_shift, s_shift, **fit.maps)
    assert np.mean(shifted.ece_after) > 3 * np.mean(same.ece_after)
    assert min(shifted.ece_after) > 0.03
    # The held-out section of the file carries these numbers and their means.
    report = heldout_report(same, num_rounds=len(z_same), bins=15, prompts="p.jsonl", num_prompts=9)
    assert report.mean_ece_after == pytest.approx(np.mean(same.ece_after))
    assert report.num_samples == [len(z_same)] * 7 and report.num_prompts == 9


def bent_rounds(n=40_000, seed=0):
    """A head under-confident above its median z = 1 (true logit 2 (z - 1)) and
    over-confident below it ((z - 1) / 2): one temperature, even with a bias,
    cannot undo that; a monotone piecewise-linear map can."""
    rng = np.random.default_rng(seed)
    z = 1.0 + rng.normal(0, 2.5, (n, 4))
    true = np.where(z > 1, 2 * (z - 1), (z - 1) / 2)  # true acceptance logits
    accepted = rng.random(true.shape) < sigmoid(true)
    return z, np.cumprod(accepted, axis=1).astype(float)


@pytest.mark.parametrize("form, objective", [("temperature", "ece"), ("temperature", "nll"), ("platt", "nll")])
def test_piecewise_map_fits_what_one_temperature_cannot(form, objective):
    z, survival = bent_rounds(seed=0)
    z_eval, s_eval = bent_rounds(seed=1)
    fit = fit_sts(z, survival)
    rich = evaluate_calibration(z_eval, s_eval, **fit.maps)
    simple = evaluate_calibration(z_eval, s_eval, **fit_sts(z, survival, form=form, objective=objective).maps)
    assert max(rich.ece_after) < 0.015
    # Position 1 (no prefix) is the bent line itself: flat below the median, steep above.
    assert fit.method == "piecewise/nll" and len(fit.knots[0]) == 3 and len(fit.slopes[0]) == 4
    assert fit.slopes[0][0] < 0.7 and fit.slopes[0][-1] > 1.4
    np.testing.assert_allclose(calibrated_logits(np.array([[0.0, 0, 0, 0]]), **fit.maps)[0, 0], -0.5, atol=0.15)
    assert np.mean(simple.ece_after) > 2 * np.mean(rich.ece_after)


def test_forms_reduce_to_temperature_scaling_and_leave_calibrated_logits_alone():
    z, survival, true_t = synthetic_rounds(n=20_000, seed=4)
    calibrated = z / true_t
    for form in ("temperature", "platt", "piecewise"):
        r = fit_sts(calibrated, survival, form=form)
        # Parameters trade off against each other where the data are thin; the map is what counts.
        moved = np.abs(sigmoid(calibrated_logits(calibrated, **r.maps)) - sigmoid(calibrated))
        assert moved.mean() < 0.01 and moved.max() < 0.1
        assert r.method == f"{form}/nll" and max(r.ece_after) < 0.02
    # Equal slopes on every segment: the piecewise shape is the line s * z.
    flat = dict(knots=[[-1.0, 0.5, 2.0]] * 7, slopes=[[1 / t] * 4 for t in true_t])
    np.testing.assert_allclose(calibrated_logits(z, **flat), z / true_t, atol=1e-9)
    with pytest.raises(ValueError, match="temperatures only"):
        fit_sts(z, survival, form="platt", objective="ece")


def test_apply_temperatures_matches_sigmoid_and_takes_fewer_slots():
    z = torch.randn(3, 4)
    temps = [0.5, 2.0, 1.0, 4.0, 3.0]
    out = apply_temperatures(z, temps)
    torch.testing.assert_close(out, torch.sigmoid(z / torch.tensor(temps[:4])))
    np.testing.assert_allclose(out.cumprod(-1).numpy(), cumulative_survival(z.numpy(), temps), rtol=1e-5)
    with pytest.raises(DSparkConfigError, match="temperatures"):
        apply_temperatures(torch.zeros(2, 6), temps)


PIECEWISE = dict(temperatures=[0.5, 2.0, 1.0, 3.0], biases=[0.3, -0.2, 0.0, 1.0],
                 knots=[[-1.0, 2.0], [0.0, 0.5], [-3.0, -3.0], [1.0, 4.0]],
                 slopes=[[0.2, 1.0, 3.0], [1.0, 1.0, 1.0], [0.5, 9.0, 2.0], [1.0, 2.0, 1.0]])


def test_piecewise_shape_by_hand():
    """h(z): slope s_0 below the first knot, s_i between knots i and i+1, h(0) = 0; then (h + b) / T."""
    z = np.array([[-2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    g = calibrated_logits(z, **PIECEWISE)[:, 0]
    h = [0.2 * (-1.0) + 1.0 * (-1.0), 0.0, 1.0 * 2.0 + 3.0 * 1.0]  # -2: below e1 = -1; 3: above e2 = 2
    np.testing.assert_allclose(g, (np.array(h) + 0.3) / 0.5)
    # A zero-length segment (repeated knot) contributes nothing, whatever its slope.
    np.testing.assert_allclose(calibrated_logits(np.full((1, 4), -5.0), **PIECEWISE)[0, 2], 0.5 * (-5 + 3) + 2.0 * (-3 - 0))


def test_apply_temperatures_with_a_piecewise_map_matches_numpy():
    z = torch.randn(5, 3) * 4
    out = apply_temperatures(z, **PIECEWISE)
    np.testing.assert_allclose(out.cumprod(-1).numpy(), cumulative_survival(z.numpy(), **PIECEWISE), rtol=1e-5)
    plain = apply_temperatures(z, PIECEWISE["temperatures"])  # a version-1 file: z / T alone
    torch.testing.assert_close(plain, torch.sigmoid(z / torch.tensor(PIECEWISE["temperatures"][:3])))
    with pytest.raises(DSparkConfigError, match="'biases' has 2 entries"):
        apply_temperatures(z, PIECEWISE["temperatures"], biases=[0.0, 0.0])


def test_scaled_maps_divide_the_calibrated_logit_and_stay_in_the_family():
    """Online refinement's temperature tau on top of an offline map: g(z) / tau, written as a map."""
    z = np.random.default_rng(0).normal(0, 3, (50, 3))
    tau = np.array([1.25, 0.8, 1.0])
    scaled = scaled_maps(PIECEWISE, tau, 3)
    np.testing.assert_allclose(calibrated_logits(z, **scaled), calibrated_logits(z, **PIECEWISE) / tau)
    assert len(scaled["biases"]) == len(scaled["knots"]) == 3 and scaled["slopes"] == PIECEWISE["slopes"][:3]
    v1 = scaled_maps(dict(temperatures=[0.5, 2.0, 1.0], biases=None, knots=None, slopes=None), tau, 3)
    assert v1["biases"] is None and v1["knots"] is None
    np.testing.assert_allclose(v1["temperatures"], [0.625, 1.6, 1.0])
    assert scaled_maps(None, tau, 2) == dict(temperatures=[1.25, 0.8], biases=None, knots=None, slopes=None)


# -- the calibration file ------------------------------------------------------
def write(tmp_path, payload):
    path = tmp_path / "calibration.json"
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


def test_calibration_file_roundtrip(tmp_path):
    z, survival, _ = synthetic_rounds(n=2000)
    fit = fit_sts(z, survival)
    z_eval, s_eval, _ = synthetic_rounds(n=2000, seed=1)
    held = heldout_report(evaluate_calibration(z_eval, s_eval, **fit.maps), num_rounds=2000, bins=15,
                          prompts="heldout.jsonl", num_prompts=16)
    cal = calibration_from_fit(fit, heldout=held, num_rounds=2000, num_prompts=32, draft_model="d",
                               target_model="t", temperature_sampling=0.0)
    save_calibration(cal, tmp_path / "c.json")
    loaded = load_calibration(tmp_path / "c.json", block_size=7)
    assert loaded == cal and loaded.block_size == 7 and len(loaded.temperatures) == 7
    assert loaded.version == 2 and len(loaded.biases) == len(loaded.knots) == len(loaded.slopes) == 7
    assert loaded.heldout.num_prompts == 16 and loaded.heldout.mean_ece_after < 0.03
    assert loaded.method == "piecewise/nll"
    # The map the file describes is the one that was fitted.
    np.testing.assert_allclose(cumulative_survival(z, **loaded.maps), cumulative_survival(z, **fit.maps))
    minimal = load_calibration(write(tmp_path, {"block_size": 2, "temperatures": [1, 0.5]}))
    assert minimal.version == 1 and minimal.ece_after is None and minimal.heldout is None
    assert minimal.maps == {"temperatures": [1, 0.5], "biases": None, "knots": None, "slopes": None}


def test_version_1_files_still_load(tmp_path):
    """A file written before held-out metrics and biases existed (the old default pair's)."""
    old = {"version": 1, "block_size": 3, "temperatures": [0.68, 0.79, 0.70],
           "ece_before": [0.05, 0.08, 0.08], "ece_after": [0.02, 0.04, 0.05],
           "auc_before": [0.83, 0.83, 0.84], "auc_after": [0.83, 0.83, 0.84],
           "num_samples": [8068, 8014, 8022], "num_rounds": 8068, "draft_model": "d",
           "target_model": "t", "temperature_sampling": 0.0}
    cal = load_calibration(write(tmp_path, old), block_size=3)
    assert cal.temperatures == [0.68, 0.79, 0.70] and cal.knots is None and cal.biases is None
    z = torch.randn(4, 3)
    torch.testing.assert_close(apply_temperatures(z, **cal.maps),
                               torch.sigmoid(z / torch.tensor(old["temperatures"])))


@pytest.mark.parametrize("payload, block_size, match", [
    ("{not json", None, "not valid JSON"),
    ("[1, 2]", None, "JSON object"),
    ({"block_size": 2}, None, "temperatures is missing; recalibrate"),
    ({"block_size": 2, "temperatures": [1.0, -0.5]}, None, "'temperatures' must be finite and > 0"),
    ({"block_size": 2, "temperatures": [1.0, "NaN"]}, None, "'temperatures' must be finite"),
    ({"block_size": 2, "temperatures": [1.0, "x"]}, None, "temperatures[1] must be a number (got 'x')"),
    ({"block_size": 3, "temperatures": [1.0, 1.0]}, None, "'temperatures' has 2 entries but 'block_size' is 3"),
    ({"version": 3, "block_size": 1, "temperatures": [1.0]}, None, "version must be 1 or 2 (got 3)"),
    ({"version": 2, "block_size": 2, "temperatures": [1.0, 1.0], "biases": [0.1, 0.2, 0.3]}, None,
     "'biases' has 3 entries but 'block_size' is 2"),
    ({"version": 2, "block_size": 2, "temperatures": [1.0, 1.0], "knots": [[0.0], [0.0]],
      "slopes": [[1.0, 1.0], [1.0, 0.0]]}, None, "'slopes' must be finite and > 0, got [0.0]"),
    ({"version": 2, "block_size": 2, "temperatures": [1.0, 1.0], "knots": [[0.0], [0.0]]}, None,
     "'knots' and 'slopes' go together"),
    ({"version": 2, "block_size": 2, "temperatures": [1.0, 1.0], "knots": [[0.0], [0.0, 1.0]],
      "slopes": [[1.0, 1.0], [1.0, 1.0, 1.0]]}, None, "the same number m of 'knots' and m + 1 'slopes'"),
    ({"version": 2, "block_size": 1, "temperatures": [1.0], "knots": [[1.0, 0.0]], "slopes": [[1.0] * 3]},
     None, "'knots' must be in increasing order"),
    ({"version": 2, "block_size": 1, "temperatures": [1.0], "biases": ["x"]}, None,
     "biases[0] must be a number (got 'x')"),
    ({"block_size": 1, "temperatures": [1.0], "biases": [0.5]}, None,
     "'biases', 'knots' and 'slopes' need 'version': 2"),
    ({"block_size": 1, "temperatures": [1.0], "heldout": {"num_rounds": 10, "ece_before": [0.1],
      "ece_after": ["x"], "auc_before": [0.8], "auc_after": [0.8], "num_samples": [10]}}, None,
     "heldout.ece_after[0] must be a number (got 'x')"),
    ({"block_size": 1, "temperatures": [1.0], "heldout": {"ece_before": [0.1], "ece_after": [0.1],
      "auc_before": [0.8], "auc_after": [0.8], "num_samples": [10]}}, None,
     "heldout.num_rounds is missing"),
    ({"block_size": 1, "temperatures": [1.0], "heldout": [0.1]}, None, "heldout must be a JSON object"),
    ({"block_size": 5, "temperatures": [1.0] * 5}, 7,
     "is for block_size 5 but the draft checkpoint has block_size 7; recalibrate with scripts/calibrate.py"),
])
def test_load_calibration_errors_name_the_field(tmp_path, payload, block_size, match):
    with pytest.raises(DSparkConfigError, match=re.escape(match)):
        load_calibration(write(tmp_path, payload), block_size=block_size)


def test_load_calibration_missing_file(tmp_path):
    with pytest.raises(DSparkConfigError, match="cannot read"):
        load_calibration(tmp_path / "nope.json")


def test_calibration_file_round_trip(tmp_path):
    """What save_calibration writes, load_calibration reads back field for field (the JSON keys
    are the documented format)."""
    from dspark_vllm.calibration import STSResult

    fit = STSResult(temperatures=[1.5, 0.75], ece_before=[0.1, None], ece_after=[0.02, None],
                    auc_before=[0.8, 0.7], auc_after=[0.8, 0.7], num_samples=[100, 0])
    written = calibration_from_fit(fit, num_rounds=100, draft_model="d", target_model="t",
                                   temperature_sampling=0.0)
    path = tmp_path / "cal.json"
    save_calibration(written, path)
    raw = json.loads(path.read_text())
    assert raw["version"] == 1 and raw["block_size"] == 2 and raw["temperatures"] == [1.5, 0.75]
    assert raw["ece_before"] == [0.1, None] and raw["num_rounds"] == 100 and raw["draft_model"] == "d"
    read = load_calibration(path, block_size=2)
    assert read == written


# -- scripts/calibrate.py --------------------------------------------------------
def test_greedy_survival_is_the_prefix_match_and_masks_past_the_end():
    from dspark_vllm import rollout

    text = torch.tensor([10, 11, 12, 13, 14, 15])
    drafts = torch.tensor([[12, 13, 99], [14, 15, 16], [99, 15, 16]])
    anchors = torch.tensor([1, 3, 3])  # slot k predicts position anchor + 1 + k
    survival, observed = rollout.greedy_survival(drafts, text, anchors)
    assert survival.tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 0]]
    # Row 1 ran past the text at slot 3; row 2 failed at slot 1, so all is known.
    assert observed.tolist() == [[True, True, True], [True, True, False], [True, True, True]]


def test_sampled_survival_reads_the_target_on_the_drafted_prefix(fixture_paths):
    """Drafting the text itself: p must equal the text forward's distribution."""
    from transformers import AutoModelForCausalLM

    from dspark_vllm.training.target import target_features, target_logits

    from dspark_vllm import rollout

    target = AutoModelForCausalLM.from_pretrained(fixture_paths["target"]).eval()
    text = torch.randint(0, 500, (20,), generator=torch.Generator().manual_seed(0))
    K, T = 4, 0.7
    anchors = torch.tensor([3, 8, 15])
    drafts = torch.stack([text[a + 1: a + 1 + K] for a in anchors.tolist()])
    _, last_hidden = target_features(target, text[None], [0])
    p_text = (target_logits(target, last_hidden[0]) / T).softmax(-1)
    at = anchors[:, None] + torch.arange(K)
    q = torch.full((3, K, p_text.shape[-1]), 1.0 / p_text.shape[-1])
    survival, observed = rollout.sampled_survival(target, drafts, q, text, anchors, T)
    p_d = p_text[at, drafts]
    expected = (p_d / q[..., 0]).clamp(max=1).cumprod(1)
    torch.testing.assert_close(survival, expected, rtol=1e-4, atol=1e-6)
    assert observed.all()


def write_prompts(path, turns):
    path.write_text("".join(json.dumps({"turns": [t]}) + "\n" for t in turns))
    return path


def test_calibrate_script_end_to_end(fixture_paths, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", ["def fib(n):\n", "import os\n\nclass ", "for i in range("])
    held = write_prompts(tmp_path / "held.jsonl", ["while True:\n", "x = [", "print("])
    out, plot = tmp_path / "calibration.json", tmp_path / "reliability.png"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--target", fixture_paths["target"], "--draft",
         fixture_paths["dspark"], "--prompts", str(prompts), "--eval-prompts", str(held),
         "--eval-max-prompts", "2", "--raw", "--max-tokens", "12",
         "--out", str(out), "--plot", str(plot), "--device", "cpu"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ECE" in proc.stdout and "AUC" in proc.stdout and "held out" in proc.stdout
    cal = load_calibration(out, block_size=7)
    assert cal.num_rounds > 0 and cal.temperature_sampling == 0.0 and cal.num_prompts == 3
    assert cal.draft_model == fixture_paths["dspark"] and cal.method == "piecewise/nll"
    assert cal.heldout.num_prompts == 2 and cal.heldout.num_rounds > 0
    assert cal.heldout.prompts == str(held) and len(cal.heldout.ece_after) == 7
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibrate_script_refuses_evaluation_prompts_it_fits_on(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("calibrate_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    fit = write_prompts(tmp_path / "fit.jsonl", ["a = 1\n", "b = 2\n"])
    held = write_prompts(tmp_path / "held.jsonl", ["c = 3\n", "a = 1\n"])
    args = script.parse_args(["--target", "t", "--draft", "d", "--prompts", str(fit), "--eval-prompts",
                              str(held), "--out", "o.json"])
    with pytest.raises(SystemExit, match="1 of the --eval-prompts are also --prompts"):
        script.load_prompt_sets(args)
    args.eval_max_prompts = 1  # only "c = 3": disjoint
    assert script.load_prompt_sets(args) == (["a = 1\n", "b = 2\n"], ["c = 3\n"])
