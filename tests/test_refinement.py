"""Online STS refinement (dspark_vllm/refinement.py) on synthetic rounds, and its options."""

import numpy as np
import pytest

from dspark_vllm.calibration import sigmoid
from dspark_vllm.config import options_from_additional_config
from dspark_vllm.model.config import DSparkConfigError
from dspark_vllm.refinement import OnlineCalibration, round_outcomes

TRUE_T = np.array([0.5, 0.7, 1.0, 1.4, 2.0, 2.5, 3.0])  # the head's logits are off by these factors


def rounds(n: int, rng, temperatures=TRUE_T, verified: int = 7):
    """n rounds whose slot k truly survives with sigmoid(z_k / T_k) given the slots before it."""
    z = rng.normal(1.0, 2.0, size=(n, len(temperatures)))
    alive = rng.random(z.shape) < sigmoid(z / temperatures)
    accepted = np.minimum(np.cumprod(alive, axis=1).sum(1), verified)
    return z, np.full(n, verified), accepted


def test_round_outcomes_know_verified_slots_and_slots_after_a_rejection():
    survived, known = round_outcomes(np.array([3, 3, 0]), np.array([3, 1, 0]), 5)
    assert survived.tolist()[0] == [True, True, True, False, False]
    assert known.tolist() == [[True, True, True, False, False],  # all 3 survived: slot 4 untested
                              [True, True, True, True, True],  # slot 2 rejected: nothing after survives
                              [False] * 5]  # nothing verified


def test_converges_to_a_known_miscalibration():
    """From T = 1 everywhere, re-fits every 512 rounds on an 8192-round window reach the true
    temperatures after 16k rounds (each re-fit moves a temperature by <= 25%): within 5% where
    thousands of rounds reach the slot, 15% at the last slots (~300-800 of 8192 rounds reach them)."""
    rng = np.random.default_rng(0)
    online = OnlineCalibration(np.ones(7), every=512, window=8192, max_change=0.25)
    history = []
    for _ in range(16_384 // 256):
        online.observe(*rounds(256, rng))
        if online.take_update() is not None:
            history.append(online.temperatures.copy())
    assert online.refits == len(history) == 16_384 // 512
    assert np.allclose(online.temperatures[:3], TRUE_T[:3], rtol=0.05), online.temperatures
    assert np.allclose(online.temperatures, TRUE_T, rtol=0.15), online.temperatures
    steps = np.abs(np.diff(np.log(np.array([np.ones(7)] + history)), axis=0))
    assert steps.max() <= np.log(1.25) + 1e-9  # bounded change per update
    assert online.window_ece(online.temperatures) < online.window_ece(np.ones(7)) / 3
    assert online.live_ece < 0.03


def test_update_waits_for_the_next_round():
    """A re-fit never touches the temperatures in use: lengths already chosen with them stand,
    and the new ones apply only after take_update (called before the next drafting round)."""
    rng = np.random.default_rng(1)
    online = OnlineCalibration(np.ones(7), every=100, window=400, max_change=0.5)
    online.observe(*rounds(99, rng))
    assert online.refits == 0 and online.take_update() is None
    in_use = online.temperatures.copy()
    online.observe(*rounds(1, rng))  # the 100th round: re-fit
    assert online.refits == 1
    assert np.array_equal(online.temperatures, in_use)  # not applied yet
    update = online.take_update()
    assert update is not None and not np.array_equal(update, in_use)
    assert np.array_equal(online.temperatures, update) and online.take_update() is None


def test_well_calibrated_head_stays_put():
    rng = np.random.default_rng(2)
    online = OnlineCalibration(np.ones(7), every=1024, window=4096, max_change=0.25)
    for _ in range(16):
        online.observe(*rounds(512, rng, temperatures=np.ones(7)))
        online.take_update()
    assert np.allclose(online.temperatures, 1.0, rtol=0.1)


@pytest.mark.parametrize("bad,field", [({"every": 0}, "refinement.every"),
                                       ({"every": 64, "window": 32}, "refinement.window"),
                                       ({"max_change": -1}, "refinement.max_change"),
                                       ({"evry": 3}, "refinement.evry")])
def test_malformed_refinement_options_name_the_field(bad, field):
    with pytest.raises(DSparkConfigError, match=field.replace(".", r"\.")):
        options_from_additional_config({"dspark": {"draft_model": "/x", "refinement": bad}})
    assert options_from_additional_config({"dspark": {"draft_model": "/x", "refinement": {}}}).refinement.every == 1024
