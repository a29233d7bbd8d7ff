"""Sequential Temperature Scaling (STS) of the confidence head (paper section 3.2.1).

The confidence head gives, for draft slot k of a block, a logit z_k with
c_k = sigmoid(z_k) = P(slot k survives | slots < k survived). The scheduler
needs the *cumulative* survival a_k = prod_{j<=k} c_j to be calibrated, not
just ranked. STS maps each logit through a per-position function,
c_k = sigmoid(g_k(z_k)), and fits g_1..g_K left to right on held-out drafting
rounds: with g_1..g_{k-1} fixed, g_k is chosen so that
prod_{j<=k} sigmoid(g_j(z_j)) matches the observed prefix survival
S_k = prod_{j<=k} 1[slot j accepted]. Position k is fitted given the
calibrated prefix, so its map also absorbs what the product of the earlier
calibrated slots gets wrong.

The map of one position (`calibrated_logits`) is

    g_k(z) = (h_k(z) + b_k) / T_k,

where h_k is the identity, or a monotone piecewise-linear shape: slopes
s_k0, ..., s_km > 0 between knots e_k1 < ... < e_km, with h_k(0) = 0. Three
forms (`fit_sts(form=...)`):
- "temperature": g_k(z) = z / T_k, the paper's STS;
- "platt": a temperature and a bias per position (Platt scaling);
- "piecewise" (the default): h_k with knots at quantiles of the position's
  logits (3 by default) and a bias, T_k = 1. On the default pair the raw head
  is over-confident in the middle of its range and about right at the top, a
  shape that one temperature, with or without a bias, cannot bend into
  (held-out mean ECE: temperature 3.4%, platt 2.7%, piecewise 1.4%; see the
  default pair's README).
Every form is increasing in z, so it never changes the ranking of one slot's
rounds. T_k stays a separate factor so that online refinement
(refinement.py) can rescale any map: g_k / tau_k = (h_k + b_k) / (T_k tau_k).

The objective is the log-loss (a proper scoring rule) of the cumulative
survival at position k: unlike ECE it is smooth, needs no binning, and pins
down the map where predictions are small (late positions).
`objective="ece"` keeps the paper's 1-D search that minimises the ECE of the
cumulative survival (temperature form only).

S_k is observed for every k of a round (after the first rejection it is 0), so
no per-slot masking is needed, except where a round runs past the end of the
held-out text; `observed` marks those entries.

Outcomes may be soft (in [0, 1]): at sampling temperature > 0 the calibration
script uses the exact survival probability prod min(1, p/q) instead of one
random draw. ECE, AUC and the log-loss accept soft outcomes (AUC then counts a
sample with outcome y as y positive and 1 - y negative).

The fitted maps go to a small JSON file (`CalibrationFile`) that the plugin
loads with `load_calibration` and applies with `apply_temperatures`.
Temperature-only files (version 1, the paper's form) stay valid; files with
`biases` or `knots` / `slopes` are version 2, so a reader that only knows
temperatures refuses them instead of silently dropping a part of the map.
`evaluate_calibration` measures a map on rounds it was not fitted on: the
`heldout` section of the file, the number to quote.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
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


# -- the calibration map --------------------------------------------------------
def sigmoid(x: np.ndarray) -> np.ndarray:
    """Overflow-free logistic function."""
    return np.exp(-np.logaddexp(0.0, -x))


@dataclass
class ConfidenceMap:
    """g_k(z_k) = (h_k(z_k) + b_k) / T_k as tensors on one device, the segment bounds of h_k
    derived once: what serving applies to every drafting round (`map_logits` builds one).

    h_k(z) = sum_i s_ki * (clip(z, e_i, e_i+1) - clip(0, e_i, e_i+1)) over the
    segments between e_0 = -inf, the knots, and e_m+1 = +inf; the identity
    without slopes. T = 1 and b = 0 where None.
    """

    temperatures: torch.Tensor | None  # [K]
    biases: torch.Tensor | None  # [K]
    slopes: torch.Tensor | None  # [K, m + 1]
    lo: torch.Tensor | None  # [K, m + 1] lower and upper bound of each segment
    hi: torch.Tensor | None
    at_zero: torch.Tensor | None  # [K, m + 1] clip(0, lo, hi): h_k(0) = 0

    @classmethod
    def of(cls, temperatures=None, biases=None, knots=None, slopes=None, dtype=torch.float32,
           device=None) -> "ConfidenceMap":
        def tensor(values):
            return None if values is None else torch.as_tensor(values, dtype=dtype, device=device)

        lo = hi = at_zero = None
        if slopes is not None:
            e = tensor(knots)
            inf = torch.full_like(e[:, :1], math.inf)
            lo, hi = torch.cat([-inf, e], 1), torch.cat([e, inf], 1)
            at_zero = torch.zeros((), dtype=dtype, device=device).clamp(lo, hi)
        return cls(tensor(temperatures), tensor(biases), tensor(slopes), lo, hi, at_zero)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """The calibrated logits of z [..., K'] (K' <= K: the first K' positions)."""
        k = z.shape[-1]
        x = z
        if self.slopes is not None:
            x = (self.slopes[:k] * (z[..., None].clamp(self.lo[:k], self.hi[:k]) - self.at_zero[:k])).sum(-1)
        if self.biases is not None:
            x = x + self.biases[:k]
        return x if self.temperatures is None else x / self.temperatures[:k]


def map_logits(z: torch.Tensor, temperatures=None, biases=None, knots=None, slopes=None) -> torch.Tensor:
    """g_k(z_k) for logits z [..., K] (torch; see `ConfidenceMap`)."""
    return ConfidenceMap.of(temperatures, biases, knots, slopes, dtype=z.dtype, device=z.device)(z)


def calibrated_logits(conf_logits, temperatures=None, biases=None, knots=None, slopes=None) -> np.ndarray:
    """`map_logits` on numpy logits [..., K] (float64)."""
    z = torch.as_tensor(np.asarray(conf_logits, dtype=np.float64))
    return map_logits(z, temperatures, biases, knots, slopes).numpy()


def cumulative_survival(conf_logits, temperatures=None, biases=None, knots=None, slopes=None) -> np.ndarray:
    """a_k = prod_{j<=k} sigmoid(g_j(z_j)) for z [N, K] (the raw head when no map is given)."""
    return np.cumprod(sigmoid(calibrated_logits(conf_logits, temperatures, biases, knots, slopes)), axis=-1)


# -- fitting one position ---------------------------------------------------------
DEFAULT_GRID = np.geomspace(0.05, 20.0, 241)
FORMS = ("temperature", "platt", "piecewise")
OBJECTIVES = ("nll", "ece")


def fit_position(prefix, z, outcome, bins: int = 15, grid: np.ndarray = DEFAULT_GRID) -> float:
    """The T minimising ECE(prefix * sigmoid(z / T), outcome), by a 1-D search (the paper's STS).

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


def survival_log_loss(prefix, x, outcome) -> torch.Tensor:
    """Mean -[y log a + (1 - y) log(1 - a)] of a = prefix * sigmoid(x) (torch, differentiable in x).

    log(1 - a) is computed as log((1 - prefix) sigmoid(x) + sigmoid(-x)), which
    stays finite where a is close to 1 (a plain log1p(-a) loses the gradient there).
    """
    log_a = torch.log(prefix) + F.logsigmoid(x)
    log_not_a = torch.logaddexp(torch.log1p(-prefix) + F.logsigmoid(x), F.logsigmoid(-x))
    return -(outcome * log_a + (1 - outcome) * log_not_a).mean()


TEMPERATURE_BOUNDS = (0.01, 1000.0)  # slopes of the piecewise shape: the inverse range


def fit_position_nll(prefix, z, outcome, form: str = "piecewise", grid: np.ndarray = DEFAULT_GRID,
                     num_knots: int = 3) -> dict:
    """The map of one position minimising the log-loss of prefix * sigmoid(g(z)) against outcome.

    The temperature alone is searched on a coarse grid over `grid`'s range first
    (a start on the right side of a flat region matters); the form's other
    parameters then join, from that start, in an L-BFGS refinement. Returns the
    position's temperature, bias, knots and slopes (None where the form has none).
    Temperatures and slopes are log-parameterised and kept in TEMPERATURE_BOUNDS
    (inverted for slopes), so the map stays increasing in z: a slot's ranking
    never changes. The knots are fixed at quantiles of z.
    """
    p = torch.as_tensor(np.clip(prefix, 1e-300, 1.0), dtype=torch.float64)
    zt = torch.as_tensor(z, dtype=torch.float64)
    y = torch.as_tensor(outcome, dtype=torch.float64)
    start = np.geomspace(grid[0], grid[-1], 61)  # a start, not the answer: coarse is enough
    with torch.no_grad():
        losses = [float(survival_log_loss(p, zt / t, y)) for t in start]
    lo, hi = (math.log(b) for b in TEMPERATURE_BOUNDS)
    log_t0 = math.log(start[int(np.argmin(losses))])
    knots = None
    if form == "piecewise":
        knots = torch.as_tensor(np.unique(np.quantile(z, np.linspace(0, 1, num_knots + 2)[1:-1])))
    log_t = torch.tensor(0.0 if knots is not None else log_t0, dtype=torch.float64,
                         requires_grad=knots is None)
    log_slopes = torch.full((0 if knots is None else len(knots) + 1,), -log_t0, dtype=torch.float64,
                            requires_grad=knots is not None)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=form != "temperature")
    params = [v for v in (log_t, log_slopes, bias) if v.requires_grad]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=200, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def current():
        slopes = None if knots is None else log_slopes.clamp(-hi, -lo).exp()
        return log_t.clamp(lo, hi).exp(), slopes

    def closure():
        opt.zero_grad()
        t, slopes = current()
        loss = survival_log_loss(p, map_logits(zt[:, None], t[None], bias[None], None if knots is None
                                               else knots[None], None if slopes is None else slopes[None])[:, 0], y)
        loss.backward()
        return loss

    opt.step(closure)
    t, slopes = current()
    return dict(temperature=float(t.detach()), bias=None if form == "temperature" else float(bias.detach()),
                knots=None if knots is None else knots.tolist(),
                slopes=None if slopes is None else slopes.detach().tolist())


# -- STS: the sequential fit, and its evaluation --------------------------------------
def _metric(fn, pred, outcome):
    value = fn(pred, outcome) if len(pred) else float("nan")
    return None if math.isnan(value) else value


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


@dataclass
class CalibrationMetrics:
    """ECE and AUC of the cumulative survival per position, raw head vs calibrated map."""

    ece_before: list[float | None]
    ece_after: list[float | None]
    auc_before: list[float | None]
    auc_after: list[float | None]
    num_samples: list[int]  # observed rounds per position

    def summary(self) -> str:
        def f(x):
            return "nan" if x is None else f"{x:.4f}"

        return (f"ECE {f(_mean(self.ece_before))} -> {f(_mean(self.ece_after))}, "
                f"AUC {f(_mean(self.auc_before))} -> {f(_mean(self.auc_after))} "
                f"(means over {len(self.ece_before)} positions)")


def evaluate_calibration(conf_logits, survival, observed=None, temperatures=None, biases=None, knots=None,
                         slopes=None, bins: int = 15) -> CalibrationMetrics:
    """Metrics of a map on rounds [N, K] (fitted on them, or held out: the honest number)."""
    z = np.asarray(conf_logits, dtype=np.float64)
    s = np.asarray(survival, dtype=np.float64)
    if z.ndim != 2 or z.shape != s.shape:
        raise ValueError(f"conf_logits {z.shape} and survival {s.shape} must both be [N, K]")
    obs = np.ones(z.shape, bool) if observed is None else np.asarray(observed, bool)
    raw, cal = cumulative_survival(z), cumulative_survival(z, temperatures, biases, knots, slopes)
    m = CalibrationMetrics([], [], [], [], [])
    for k in range(z.shape[1]):
        rows = obs[:, k]
        m.num_samples.append(int(rows.sum()))
        m.ece_before.append(_metric(lambda p, y: ece(p, y, bins), raw[rows, k], s[rows, k]))
        m.ece_after.append(_metric(lambda p, y: ece(p, y, bins), cal[rows, k], s[rows, k]))
        m.auc_before.append(_metric(auc, raw[rows, k], s[rows, k]))
        m.auc_after.append(_metric(auc, cal[rows, k], s[rows, k]))
    return m


@dataclass
class STSResult(CalibrationMetrics):
    """Fitted maps and the metrics on the rounds they were fitted on."""

    temperatures: list[float] = field(default_factory=list)
    biases: list[float] | None = None  # forms "platt" and "piecewise"
    knots: list[list[float]] | None = None  # form "piecewise"
    slopes: list[list[float]] | None = None  # form "piecewise"
    method: str = "temperature/ece"

    @property
    def maps(self) -> dict:
        """temperatures, biases, knots, slopes: the keyword arguments of the map functions."""
        return dict(temperatures=self.temperatures, biases=self.biases, knots=self.knots, slopes=self.slopes)


def fit_sts(conf_logits, survival, observed=None, bins: int = 15, grid: np.ndarray = DEFAULT_GRID,
            form: str = "piecewise", objective: str = "nll", num_knots: int = 3) -> STSResult:
    """Sequential Temperature Scaling: g_1..g_K left to right, each given the calibrated prefix.

    conf_logits: [N, K] the head's logits z_k of N drafting rounds.
    survival:    [N, K] observed prefix survival S_k (0/1, or soft in [0, 1]).
    observed:    [N, K] bool, False where S_k is unknown (round ran past the text).
    form:        "temperature" (the paper), "platt" or "piecewise" (see the module doc).
    objective:   "nll" (log-loss of the cumulative survival) or "ece" (the paper's
                 search; "temperature" form only).
    num_knots:   knots of the "piecewise" shape (at quantiles of each position's logits).
    """
    if form not in FORMS or objective not in OBJECTIVES:
        raise ValueError(f"form must be one of {FORMS} and objective one of {OBJECTIVES}, "
                         f"got {form!r}, {objective!r}")
    if objective == "ece" and form != "temperature":
        raise ValueError("objective 'ece' fits temperatures only; use objective 'nll' for "
                         f"form {form!r}")
    z = np.asarray(conf_logits, dtype=np.float64)
    s = np.asarray(survival, dtype=np.float64)
    if z.ndim != 2 or z.shape != s.shape:
        raise ValueError(f"conf_logits {z.shape} and survival {s.shape} must both be [N, K]")
    obs = np.ones(z.shape, bool) if observed is None else np.asarray(observed, bool)
    identity = dict(temperature=1.0, bias=0.0, knots=[0.0] * num_knots, slopes=[1.0] * (num_knots + 1))
    fits = []
    prefix = np.ones(z.shape[0])  # prod_{j<k} sigmoid(g_j(z_j)), calibrated
    for k in range(z.shape[1]):
        rows = obs[:, k]
        if not rows.any():
            fit = identity
        elif objective == "ece":
            fit = dict(temperature=fit_position(prefix[rows], z[rows, k], s[rows, k], bins, grid))
        else:
            fit = fit_position_nll(prefix[rows], z[rows, k], s[rows, k], form, grid, num_knots)
        if form == "piecewise":  # logits with fewer distinct quantiles: zero-length segments
            fit = dict(fit, knots=fit["knots"] + [fit["knots"][-1]] * (num_knots - len(fit["knots"])),
                       slopes=fit["slopes"] + [1.0] * (num_knots + 1 - len(fit["slopes"])))
        fits.append(fit)
        prefix = prefix * sigmoid(calibrated_logits(z[:, k:k + 1], **_maps_of([fit], form))[:, 0])
    maps = _maps_of(fits, form)
    metrics = evaluate_calibration(z, s, obs, bins=bins, **maps)
    return STSResult(**vars(metrics), **maps, method=f"{form}/{objective}")


def _maps_of(fits: list[dict], form: str) -> dict:
    """Per-position fits -> the map arguments (lists over positions; None where the form has none)."""
    piecewise = form == "piecewise"
    return dict(temperatures=[f["temperature"] for f in fits],
                biases=[f.get("bias") or 0.0 for f in fits] if form != "temperature" else None,
                knots=[f["knots"] for f in fits] if piecewise else None,
                slopes=[f["slopes"] for f in fits] if piecewise else None)


def scaled_maps(maps: dict | None, scale, num_positions: int) -> dict:
    """The map g_k(z) / tau_k of the first `num_positions` positions, as map arguments.

    Online refinement (refinement.py) fits a temperature tau_k on top of the offline
    map: g_k / tau_k = (h_k + b_k) / (T_k tau_k), the same map with its
    temperatures multiplied. Without an offline map, g_k(z) = z and the result
    is plain temperature scaling by tau.
    """
    tau = np.asarray(scale, dtype=np.float64)[:num_positions]
    if maps is None:
        return dict(temperatures=tau.tolist(), biases=None, knots=None, slopes=None)
    cut = {k: None if v is None else list(v)[:num_positions] for k, v in maps.items()}
    return dict(cut, temperatures=(np.asarray(cut["temperatures"], np.float64) * tau).tolist())


def apply_temperatures(conf_logits: torch.Tensor, temperatures, biases=None, knots=None,
                       slopes=None) -> torch.Tensor:
    """Calibrated per-slot confidences c_k = sigmoid(g_k(z_k)) of logits [..., K'] (torch).

    With temperatures alone this is sigmoid(z_k / T_k) (a version-1 file);
    `biases`, `knots` and `slopes` (a version-2 file) complete the map of
    `map_logits`. K' may be smaller than the calibrated block size (the first
    K' entries are used). Multiply along the last dim (cumprod) for the
    survival a_k.
    """
    k = conf_logits.shape[-1]
    for name, values in (("temperatures", temperatures), ("biases", biases), ("knots", knots),
                         ("slopes", slopes)):
        if values is not None and k > len(values):
            raise DSparkConfigError(
                f"calibration {name!r} has {len(values)} entries but {k} draft slots "
                f"need them; {RECALIBRATE} for this draft checkpoint.")
    return torch.sigmoid(map_logits(conf_logits, temperatures, biases, knots, slopes))


# -- the calibration file -----------------------------------------------------
class HeldoutReport(BaseModel):
    """Metrics of the fitted map on prompts it was not fitted on (`calibrate.py --eval-prompts`).

    The in-sample numbers at the top level of the file flatter the fit; these
    are the ones to quote.
    """

    model_config = ConfigDict(extra="ignore")

    prompts: str | None = None
    num_prompts: int | None = None
    num_rounds: int
    bins: int = 15
    ece_before: list[float | None]
    ece_after: list[float | None]
    auc_before: list[float | None]
    auc_after: list[float | None]
    num_samples: list[int]
    mean_ece_before: float | None = None
    mean_ece_after: float | None = None
    mean_auc_before: float | None = None
    mean_auc_after: float | None = None


def heldout_report(metrics: CalibrationMetrics, num_rounds: int, bins: int, **meta) -> HeldoutReport:
    """The `heldout` section of a calibration file; meta: prompts, num_prompts."""
    return HeldoutReport(
        num_rounds=num_rounds, bins=bins, ece_before=metrics.ece_before, ece_after=metrics.ece_after,
        auc_before=metrics.auc_before, auc_after=metrics.auc_after, num_samples=metrics.num_samples,
        mean_ece_before=_mean(metrics.ece_before), mean_ece_after=_mean(metrics.ece_after),
        mean_auc_before=_mean(metrics.auc_before), mean_auc_after=_mean(metrics.auc_after), **meta)


class CalibrationFile(BaseModel):
    """`calibration.json`, written by scripts/calibrate.py.

    version 1: `temperatures` only (c_k = sigmoid(z_k / T_k)); version 2 adds
    `biases` and/or `knots` [K][m] with `slopes` [K][m + 1] (see `map_logits`).
    The metrics at the top level are measured on the fitting rounds, `heldout`
    on others.
    """

    model_config = ConfigDict(extra="ignore")

    version: Literal[1, 2] = 1
    block_size: int
    temperatures: list[float]
    biases: list[float] | None = None
    knots: list[list[float]] | None = None
    slopes: list[list[float]] | None = None
    method: str | None = None  # form/objective of fit_sts, e.g. "piecewise/nll"
    ece_before: list[float | None] | None = None
    ece_after: list[float | None] | None = None
    auc_before: list[float | None] | None = None
    auc_after: list[float | None] | None = None
    num_samples: list[int] | None = None
    num_rounds: int | None = None
    num_prompts: int | None = None
    prompts: str | None = None
    bins: int | None = None
    draft_model: str | None = None
    target_model: str | None = None
    temperature_sampling: float | None = None
    heldout: HeldoutReport | None = None

    @property
    def maps(self) -> dict:
        """temperatures, biases, knots, slopes: the keyword arguments of
        `apply_temperatures`, `calibrated_logits` and `cumulative_survival`."""
        return dict(temperatures=self.temperatures, biases=self.biases, knots=self.knots, slopes=self.slopes)

    def check(self, source: str) -> "CalibrationFile":
        if self.block_size < 1:
            raise DSparkConfigError(
                f"{source}: 'block_size' must be >= 1, got {self.block_size}; {RECALIBRATE}.")
        for name in ("temperatures", "biases", "knots", "slopes"):
            values = getattr(self, name)
            if values is not None and len(values) != self.block_size:
                raise DSparkConfigError(
                    f"{source}: {name!r} has {len(values)} entries but 'block_size' is "
                    f"{self.block_size}: one per draft position is needed; {RECALIBRATE}.")

        def require(name, values, ok, what):
            bad = [v for v in values if not (math.isfinite(v) and ok(v))]
            if bad:
                raise DSparkConfigError(f"{source}: {name!r} must be {what}, got {bad}; {RECALIBRATE} "
                                        f"(or set the temperatures to 1.0 to use the raw confidences).")

        require("temperatures", self.temperatures, lambda v: v > 0, "finite and > 0")
        require("biases", self.biases or [], lambda v: True, "finite")
        if (self.knots is None) != (self.slopes is None):
            raise DSparkConfigError(f"{source}: 'knots' and 'slopes' go together (the piecewise shape "
                                    f"needs both); {RECALIBRATE}.")
        if self.knots is not None:
            m = len(self.knots[0])
            if any(len(e) != m for e in self.knots) or any(len(sl) != m + 1 for sl in self.slopes):
                raise DSparkConfigError(
                    f"{source}: every position needs the same number m of 'knots' and m + 1 'slopes', "
                    f"got {[len(e) for e in self.knots]} knots and {[len(sl) for sl in self.slopes]} "
                    f"slopes; {RECALIBRATE}.")
            require("knots", [v for e in self.knots for v in e], lambda v: True, "finite")
            if any(b < a for e in self.knots for a, b in zip(e, e[1:])):
                raise DSparkConfigError(f"{source}: each position's 'knots' must be in increasing order, "
                                        f"got {self.knots}; {RECALIBRATE}.")
            require("slopes", [v for sl in self.slopes for v in sl], lambda v: v > 0, "finite and > 0")
        if self.version == 1 and any(v is not None for v in (self.biases, self.knots, self.slopes)):
            raise DSparkConfigError(
                f"{source}: 'biases', 'knots' and 'slopes' need 'version': 2 (a version-1 reader "
                f"would apply the temperatures alone); {RECALIBRATE}.")
        return self


def calibration_from_fit(result: STSResult, heldout: HeldoutReport | None = None,
                         **meta) -> CalibrationFile:
    """A CalibrationFile of an STS fit; meta: num_rounds, num_prompts, prompts, bins, draft_model, ..."""
    extended = result.biases is not None or result.slopes is not None
    return CalibrationFile(
        version=2 if extended else 1, block_size=len(result.temperatures), method=result.method,
        ece_before=result.ece_before, ece_after=result.ece_after,
        auc_before=result.auc_before, auc_after=result.auc_after,
        num_samples=result.num_samples, heldout=heldout, **result.maps, **meta,
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
