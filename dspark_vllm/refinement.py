"""Online STS refinement: re-fit the confidence temperatures on served traffic.

An offline calibration (scripts/calibrate.py) describes the prompts it was
fitted on; served traffic drifts from them (a code drafter serving prose), and a
stale calibration makes `sync` verify too much or too little. While serving,
every verified round tells us, per draft position, whether the slot survived.
`OnlineCalibration` keeps the last `window` rounds (confidence logits,
outcomes) and every `every` rounds re-fits the per-position temperatures,
sequentially like STS (slot k on the rounds whose earlier slots survived), by
log-likelihood (a proper scoring rule: unlike ECE it pins down the temperature
of late slots, whose cumulative survival is small), starting from the current
ones and moving each by at most a factor (1 + max_change). It reports the ECE
of the cumulative survival on the window (`live_ece`). The engine feeds it the
offline map's calibrated logits g_k(z) (the raw ones without a calibration
file) and starts it at 1, so the map in use is g_k(z) / tau_k
(`calibration.scaled_maps`); for a temperature-only file that is z / (T_k tau_k).

Why the output stays exact: a new temperature is computed from rounds that were
already verified and takes effect only when the next drafting round starts
(`take_update`, called before the drafter runs). It changes which drafts later
steps verify, never a decision about a draft it was fitted on, and any
verification length chosen without looking at the draft tokens themselves is
lossless (see policies.py).
"""

from __future__ import annotations

import numpy as np

from .calibration import cumulative_survival, ece


def round_outcomes(num_verified: np.ndarray, num_accepted: np.ndarray, num_positions: int):
    """Per-slot survival labels S_k and which of them are known, for n verified rounds.

    Slot k survived iff more than k drafts were accepted. It is known if it was
    verified, or if an earlier verified slot was rejected (then it cannot survive).
    """
    k = np.arange(num_positions)
    survived = num_accepted[:, None] > k
    known = (num_verified[:, None] > k) | (num_accepted < num_verified)[:, None]
    return survived, known


def best_temperature(z: np.ndarray, survived: np.ndarray, current: float, max_change: float) -> float:
    """argmin_T mean log-loss of sigmoid(z / T) against 0/1 outcomes, T within
    [current / (1 + max_change), current * (1 + max_change)] (a grid, then a finer one)."""
    lo, hi = current / (1 + max_change), current * (1 + max_change)
    for _ in range(2):
        grid = np.geomspace(lo, hi, 25)
        x = z[:, None] / grid[None, :]
        loss = (np.logaddexp(0.0, x) - survived[:, None] * x).mean(0)  # -log p(outcome)
        i = int(np.argmin(loss))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    return float(grid[i])


class OnlineCalibration:
    """A sliding window of verified rounds and the temperatures fitted on it."""

    def __init__(self, temperatures: np.ndarray, every: int, window: int, max_change: float, bins: int = 15):
        K = len(temperatures)
        self.temperatures = np.asarray(temperatures, dtype=np.float64).copy()  # in use
        self.every, self.max_change, self.bins = every, max_change, bins
        self.min_rounds = 2 * bins
        self.logits = np.zeros((window, K))
        self.survived = np.zeros((window, K), dtype=bool)
        self.known = np.zeros((window, K), dtype=bool)
        self.filled = 0  # rounds in the window
        self.next_row = 0  # ring-buffer write position
        self.since_fit = 0
        self.refits = 0
        self.live_ece = float("nan")  # mean ECE over positions of the window, temperatures in use
        self._update: np.ndarray | None = None

    def observe(self, conf_logits: np.ndarray, num_verified: np.ndarray, num_accepted: np.ndarray) -> None:
        """Rounds just verified: raw logits [n, K], drafts verified and accepted per round [n]."""
        survived, known = round_outcomes(num_verified, num_accepted, self.logits.shape[1])
        rows = (self.next_row + np.arange(len(conf_logits))) % len(self.logits)
        self.logits[rows], self.survived[rows], self.known[rows] = conf_logits, survived, known
        self.next_row = int(rows[-1] + 1) % len(self.logits) if len(rows) else self.next_row
        self.filled = min(len(self.logits), self.filled + len(rows))
        self.since_fit += len(rows)
        if self.since_fit >= self.every:
            self.refit()

    def refit(self) -> None:
        """Per position, the temperature of best log-likelihood on the window's rounds whose
        earlier slots survived (the sequential structure of STS: c_k is the survival of
        slot k given slots < k), searched within the allowed change."""
        z, s, known = self.logits[: self.filled], self.survived[: self.filled], self.known[: self.filled]
        self.live_ece = self.window_ece(self.temperatures)
        new = self.temperatures.copy()
        prefix_alive = np.ones(len(z), dtype=bool)
        for k in range(z.shape[1]):
            rows = known[:, k] & prefix_alive
            if rows.sum() >= self.min_rounds:  # too few outcomes say nothing: keep the temperature
                new[k] = best_temperature(z[rows, k], s[rows, k], new[k], self.max_change)
            prefix_alive &= s[:, k]
        self._update = new
        self.since_fit = 0
        self.refits += 1

    def window_ece(self, temperatures: np.ndarray) -> float:
        """Mean over positions of the ECE of the cumulative survival on the window."""
        n = self.filled
        a = cumulative_survival(self.logits[:n], temperatures)
        s, known = self.survived[:n], self.known[:n]
        values = [ece(a[known[:, k], k], s[known[:, k], k], self.bins)
                  for k in range(a.shape[1]) if known[:, k].any()]
        return float(np.mean(values)) if values else float("nan")

    def take_update(self) -> np.ndarray | None:
        """New temperatures, once, for the caller to use from the next drafting round on."""
        update, self._update = self._update, None
        if update is not None:
            self.temperatures = update
        return update
