"""Sequential Temperature Scaling (STS) of the confidence head (paper section 3.2.1).

The confidence head gives, for draft slot k of a block, a logit z_k with
c_k = sigmoid(z_k) = P(slot k survives | slots < k survived). The scheduler
needs the *cumulative* survival a_k = prod_{j<=k} c_j to be calibrated, not
just ranked. STS divides each logit by a per-position temperature,
c_k = sigmoid(z_k / T_k), and fits T_1..T_K left to right on held-out drafting
rounds: with T_1..T_{k-1} fixed, a 1-D grid search picks the T_k that
minimises the ECE of prod_{j<=k} sigmoid(z_j / T_j) against the observed
prefix survival S_k = prod_{j<=k} 1[slot j accepted].

S_k is observed for every k of a round (after the first rejection it is 0), so
no per-slot masking is needed, except where a round runs past the end of the
held-out text; `observed` marks those entries.

Outcomes may be soft (in [0, 1]): at sampling temperature > 0 the calibration
script uses the exact survival probability prod min(1, p/q) instead of one
random draw. ECE and AUC accept soft outcomes (AUC then counts a sample with
outcome y as y positive and 1 - y negative).

The fitted temperatures go to a small JSON file (`CalibrationFile`) that the
plugin loads with `load_calibration` and applies with `apply_temperatures`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from .model.config import DSparkConfigError, explain_validation_error

RECALIBRATE = "recalibrate with scripts/calibrate.py"


# -- metrics ------------------------------------------------------------------
def _flat(pred, outcome) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64).ravel()
    y = np.asarray(outcome, dtype=np.float64).ravel()
    if p.shape != y.shape:
        raise ValueError(f"pred has {p.size} values but outcome has {y.size}")
    return p, y


def _bin_index(p: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bins over [0, 1]; 1.0 goes to the last bin."""
    return np.clip((p * bins).astype(np.int64), 0, bins - 1)


def ece(pred, outcome, bins: int = 15) -> float:
    """Expected calibration error: sum_b (n_b / N) |mean pred_b - mean outcome_b|."""
    p, y = _flat(pred, outcome)
    if p.size == 0:
        return float("nan")
    idx = _bin_index(p, bins)
    gap = np.bincount(idx, weights=p, minlength=bins) - np.bincount(idx, weights=y, minlength=bins)
    return float(np.abs(gap).sum() / p.size)


def auc(pred, outcome) -> float:
    """ROC AUC = P(pred of a positive > pred of a negative), ties counting 1/2.

    Rank-based (Mann-Whitney) over groups of equal predictions. A soft outcome
    y counts as weight y positive and 1 - y negative; a sample is never paired
    with itself. NaN when there are no positives or no negatives.
    """
    p, y = _flat(pred, outcome)
    pairs = y.sum() * (1 - y).sum() - (y * (1 - y)).sum()
    if p.size == 0 or pairs <= 0:
        return float("nan")
    values, group = np.unique(p, return_inverse=True)
    pos = np.bincount(group, weights=y, minlength=values.size)
    neg = np.bincount(group, weights=1 - y, minlength=values.size)
    neg_below = np.cumsum(neg) - neg
    wins = (pos * (neg_below + 0.5 * neg)).sum() - 0.5 * (y * (1 - y)).sum()
    return float(wins / pairs)


@dataclass
class ReliabilityBins:
    """Per-bin data of a reliability diagram (empty bins have NaN means)."""

    edges: np.ndarray  # [bins + 1]
    count: np.ndarray  # [bins]
    mean_pred: np.ndarray  # [bins]
    mean_outcome: np.ndarray  # [bins]


def reliability_bins(pred, outcome, bins: int = 15) -> ReliabilityBins:
    p, y = _flat(pred, outcome)
    idx = _bin_index(p, bins)
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = np.bincount(idx, weights=p, minlength=bins) / count
        mean_outcome = np.bincount(idx, weights=y, minlength=bins) / count
    return ReliabilityBins(np.linspace(0, 1, bins + 1), count, mean_pred, mean_outcome)


# -- temperature scaling ------------------------------------------------------
def sigmoid(x: np.ndarray) -> np.ndarray:
    """Overflow-free logistic function."""
    return np.exp(-np.logaddexp(0.0, -x))


def cumulative_survival(conf_logits, temperatures=None) -> np.ndarray:
    """a_k = prod_{j<=k} sigmoid(z_j / T_j) for z [N, K] (T = 1 when None)."""
    z = np.asarray(conf_logits, dtype=np.float64)
    temps = np.ones(z.shape[-1]) if temperatures is None else np.asarray(temperatures, np.float64)
    return np.cumprod(sigmoid(z / temps[: z.shape[-1]]), axis=-1)


def _metric(fn, pred, outcome):
    value = fn(pred, outcome) if len(pred) else float("nan")
    return None if math.isnan(value) else value


DEFAULT_GRID = np.geomspace(0.05, 20.0, 241)


def fit_position(prefix, z, outcome, bins: int = 15, grid: np.ndarray = DEFAULT_GRID) -> float:
    """The T minimising ECE(prefix * sigmoid(z / T), outcome), by a 1-D search.

    A log-spaced grid first, then a finer grid between the best point's
    neighbours. Among equally good temperatures the one nearest 1 wins, so a
    flat objective (e.g. no data) leaves the logits as they are.
    """
    def best_of(candidates):
        scores = np.array([ece(prefix * sigmoid(z / t), outcome, bins) for t in candidates])
        good = np.flatnonzero(scores <= scores.min() + 1e-12)
        return good[np.argmin(np.abs(np.log(candidates[good])))]

    i = best_of(grid)
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    fine = np.geomspace(lo, hi, 41)
    return float(fine[best_of(fine)])


@dataclass
class STSResult:
    """Fitted temperatures and per-position metrics of the cumulative survival."""

    temperatures: list[float]
    ece_before: list[float | None]
    ece_after: list[float | None]
    auc_before: list[float | None]
    auc_after: list[float | None]
    num_samples: list[int]  # observed rounds per position

    def summary(self) -> str:
        def mean(xs):
            xs = [x for x in xs if x is not None]
            return sum(xs) / len(xs) if xs else float("nan")

        return (f"ECE {mean(self.ece_before):.4f} -> {mean(self.ece_after):.4f}, "
                f"AUC {mean(self.auc_before):.4f} -> {mean(self.auc_after):.4f} "
                f"(means over {len(self.temperatures)} positions)")


def fit_sts(conf_logits, survival, observed=None, bins: int = 15,
            grid: np.ndarray = DEFAULT_GRID) -> STSResult:
    """Sequential Temperature Scaling.

    conf_logits: [N, K] the head's logits z_k of N drafting rounds.
    survival:    [N, K] observed prefix survival S_k (0/1, or soft in [0, 1]).
    observed:    [N, K] bool, False where S_k is unknown (round ran past the text).
    """
    z = np.asarray(conf_logits, dtype=np.float64)
    s = np.asarray(survival, dtype=np.float64)
    if z.ndim != 2 or z.shape != s.shape:
        raise ValueError(f"conf_logits {z.shape} and survival {s.shape} must both be [N, K]")
    obs = np.ones(z.shape, bool) if observed is None else np.asarray(observed, bool)
    raw = cumulative_survival(z)
    temps: list[float] = []
    result = STSResult(temps, [], [], [], [], [])
    prefix = np.ones(z.shape[0])  # prod_{j<k} sigmoid(z_j / T_j), calibrated
    for k in range(z.shape[1]):
        rows = obs[:, k]
        temps.append(fit_position(prefix[rows], z[rows, k], s[rows, k], bins, grid)
                     if rows.any() else 1.0)
        prefix = prefix * sigmoid(z[:, k] / temps[k])
        result.num_samples.append(int(rows.sum()))
        result.ece_before.append(_metric(lambda p, y: ece(p, y, bins), raw[rows, k], s[rows, k]))
        result.ece_after.append(_metric(lambda p, y: ece(p, y, bins), prefix[rows], s[rows, k]))
        result.auc_before.append(_metric(auc, raw[rows, k], s[rows, k]))
        result.auc_after.append(_metric(auc, prefix[rows], s[rows, k]))
    return result


def apply_temperatures(conf_logits: torch.Tensor, temperatures) -> torch.Tensor:
    """Calibrated per-slot confidences c_k = sigmoid(z_k / T_k) of logits [..., K'].

    K' may be smaller than the calibrated block size (the first K' temperatures
    are used). Multiply along the last dim (cumprod) for the survival a_k.
    """
    k = conf_logits.shape[-1]
    temps = torch.as_tensor(temperatures, dtype=conf_logits.dtype, device=conf_logits.device)
    if k > temps.shape[0]:
        raise DSparkConfigError(
            f"calibration 'temperatures' has {temps.shape[0]} entries but {k} draft slots "
            f"need temperatures; {RECALIBRATE} for this draft checkpoint.")
    return torch.sigmoid(conf_logits / temps[:k])


# -- the calibration file -----------------------------------------------------
class CalibrationFile(BaseModel):
    """`calibration.json`, written by scripts/calibrate.py."""

    model_config = ConfigDict(extra="ignore")

    version: Literal[1] = 1
    block_size: int
    temperatures: list[float]
    ece_before: list[float | None] | None = None
    ece_after: list[float | None] | None = None
    auc_before: list[float | None] | None = None
    auc_after: list[float | None] | None = None
    num_samples: list[int] | None = None
    num_rounds: int | None = None
    draft_model: str | None = None
    target_model: str | None = None
    temperature_sampling: float | None = None

    def check(self, source: str) -> "CalibrationFile":
        if self.block_size < 1:
            raise DSparkConfigError(
                f"{source}: 'block_size' must be >= 1, got {self.block_size}; {RECALIBRATE}.")
        if len(self.temperatures) != self.block_size:
            raise DSparkConfigError(
                f"{source}: 'temperatures' has {len(self.temperatures)} entries but "
                f"'block_size' is {self.block_size}: one temperature per draft position is "
                f"needed; {RECALIBRATE}.")
        bad = [t for t in self.temperatures if not (math.isfinite(t) and t > 0)]
        if bad:
            raise DSparkConfigError(
                f"{source}: 'temperatures' must be finite and > 0, got {bad}; {RECALIBRATE} "
                f"(or set them to 1.0 to use the raw confidences).")
        return self


def calibration_from_fit(result: STSResult, **meta) -> CalibrationFile:
    """A CalibrationFile of an STS fit; meta: num_rounds, draft_model, target_model, ..."""
    return CalibrationFile(
        block_size=len(result.temperatures), temperatures=result.temperatures,
        ece_before=result.ece_before, ece_after=result.ece_after,
        auc_before=result.auc_before, auc_after=result.auc_after,
        num_samples=result.num_samples, **meta,
    ).check("calibration")


def save_calibration(calibration: CalibrationFile, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(calibration.model_dump_json(indent=2) + "\n")


def load_calibration(path: str | Path, block_size: int | None = None) -> CalibrationFile:
    """Read and check a calibration file; `block_size` is the drafter's, if known."""
    source = f"calibration file {path}"
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise DSparkConfigError(
            f"calibration: cannot read '{path}' ({e.strerror}). Pass the JSON written by "
            f"scripts/calibrate.py, or drop the calibration option to use raw confidences.") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DSparkConfigError(f"{source}: not valid JSON ({e}); {RECALIBRATE}.") from e
    if not isinstance(data, dict):
        raise DSparkConfigError(f"{source}: expected a JSON object with 'temperatures' and "
                                f"'block_size'; {RECALIBRATE}.")
    try:
        calibration = CalibrationFile.model_validate(data)
    except ValidationError as e:
        raise DSparkConfigError(f"{source}: {explain_validation_error(e)}; {RECALIBRATE}.") from None
    calibration.check(source)
    if block_size is not None and calibration.block_size != block_size:
        raise DSparkConfigError(
            f"{source} is for block_size {calibration.block_size} but the draft checkpoint has "
            f"block_size {block_size}; {RECALIBRATE}.")
    return calibration


# -- reliability diagram (paper Figure 6) ---------------------------------------
def reliability_diagram(before, after, outcome, path: str | Path, observed=None,
                        positions: Sequence[int] | None = None, bins: int = 15,
                        title: str | None = None) -> None:
    """PNG of predicted vs observed cumulative survival per draft position.

    before/after: [N, K] predicted survival a_k without / with STS;
    outcome: [N, K] observed survival S_k; observed: [N, K] mask.
    One panel per position (default 1, 3, 5, ...), each with the diagonal,
    both curves, a shaded histogram of the calibrated predictions, and ECE
    and AUC before -> after.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before, after, outcome = (np.asarray(x, np.float64) for x in (before, after, outcome))
    obs = np.ones(outcome.shape, bool) if observed is None else np.asarray(observed, bool)
    positions = list(positions) if positions is not None else list(range(0, outcome.shape[1], 2))
    fig, axes = plt.subplots(1, len(positions), figsize=(3.6 * len(positions), 3.8),
                             squeeze=False, sharey=True)
    for ax, k in zip(axes[0], positions):
        rows = obs[:, k]
        y = outcome[rows, k]
        hist = ax.twinx()
        counts = reliability_bins(after[rows, k], y, bins).count
        hist.bar(np.linspace(0, 1, bins + 1)[:-1], counts, width=1 / bins, align="edge",
                 color="0.85", zorder=0)
        hist.set_ylim(0, 2.5 * max(counts.max(), 1))  # bars stay in the lower part
        hist.set_yticks([])
        ax.set_zorder(hist.get_zorder() + 1)
        ax.patch.set_visible(False)
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="Perfect calibration")
        for pred, name, style in ((before, "Before", "o-"), (after, "After", "s-")):
            b = reliability_bins(pred[rows, k], y, bins)
            ok = b.count > 0
            e, a = ece(pred[rows, k], y, bins), auc(pred[rows, k], y)
            ax.plot(b.mean_pred[ok], b.mean_outcome[ok], style, ms=4,
                    label=f"{name}: ECE {100 * e:.1f}%, AUC {a:.3f}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"Position {k + 1} (n={int(rows.sum())})")
        ax.set_xlabel("Predicted survival")
        ax.legend(loc="upper left", fontsize=7)
    axes[0][0].set_ylabel("Observed survival")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
