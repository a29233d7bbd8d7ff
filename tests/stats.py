"""Goodness-of-fit of sampled token sequences against exact target probabilities."""

from collections import Counter, defaultdict

import numpy as np
from scipy.stats import chi2

# Significance level of every engine test of a sampled distribution. Their draws
# depend on the machine (vLLM's batch composition decides which random numbers a
# request gets), so each CI run is a fresh draw of about fifteen such checks: at
# 1e-3 one of them fails a run now and then with nothing wrong (CI failed once at
# p = 2.3e-4 on the structured-output first token, a check that engine seeds 1-6
# pass at p = 0.14-0.83). The faults these tests exist for are far louder: a TV
# distance of 0.05 at n = 3000 gives p below 1e-20 (test_engine.py), and vLLM's
# grammar cut of a sampled draft gave p = 1.5e-36 (test_structured_output.py).
ALPHA = 1e-6


def chi_square(counts: Counter, probs: np.ndarray, min_expected: float = 5.0):
    """Pearson statistic and degrees of freedom; rare cells pooled into one."""
    n = sum(counts.values())
    expected = probs * n
    big = np.flatnonzero(expected >= min_expected)
    observed = np.array([counts.get(int(t), 0) for t in big], dtype=float)
    cells_o = list(observed) + [n - observed.sum()]
    cells_e = list(expected[big]) + [n - expected[big].sum()]
    stat = sum((o - e) ** 2 / e for o, e in zip(cells_o, cells_e) if e > 1e-9)
    return stat, len(cells_o) - 1


def pvalue(counts: Counter, probs: np.ndarray) -> float:
    """Pearson chi-square p-value of token counts against probabilities."""
    return float(chi2.sf(*chi_square(counts, probs)))


def sequence_gof_pvalue(samples: list[tuple[int, ...]], cond_probs, min_group: int = 30) -> float:
    """p-value that every position j of `samples` follows cond_probs(prefix)[token].

    Samples are grouped by their prefix (tokens before j); each group with at
    least `min_group` samples contributes a chi-square test; statistics and
    degrees of freedom add up (groups are independent given their prefixes).
    """
    total, dof = 0.0, 0
    for j in range(len(samples[0])):
        groups = defaultdict(Counter)
        for s in samples:
            groups[s[:j]][s[j]] += 1
        for prefix, counts in groups.items():
            if sum(counts.values()) >= min_group:
                stat, d = chi_square(counts, cond_probs(prefix))
                total, dof = total + stat, dof + d
    return float(chi2.sf(total, dof))
