"""Prompt lookup beside the drafter: where the request's own text predicts the block.

A drafter trained on a corpus is weakest where the text copies itself: code that
repeats an identifier, an answer that quotes its question. There prompt lookup
(vLLM's `ngram` method: the tokens that followed the latest n-gram's earliest
earlier occurrence) is often right for longer. Each drafting round gets both
proposals for every request and keeps one per request:

    lookup's block  where its first token equals the drafter's first token, it
                    runs past the stretch where the two agree, and the drafter's
                    calibrated confidence c_k at the first slot where they differ
                    is below `max_confidence` (0.9): there the drafter doubts its
                    own token;
    the drafter's   everywhere else.

Lookup proposes up to K tokens and often fewer; a row that takes it verifies at
most as many. Replayed offline along the default pair's greedy answers of 128
tokens (`scripts/replay_drafts.py`, float32): on 128 calibration prompts, where
the threshold was chosen, 4.24 tokens a step against the drafter's 3.76 (4.20
without the confidence test); on 64 held-out prompts 4.48 against 4.27 (lookup
alone: 2.51; the better of the two at every step, which needs the answer: 4.90).
Over the first 64 tokens of the same answers, which repeat themselves less, the
gain is smaller: 3.67 against 3.46 and 3.76 against 3.73.

Only greedy requests take lookup's block. A sampled request verifies its drafts
against q rows, the drafter's own distributions (`Drafts.probs`), which do not
describe a lookup token.

The verification policy still judges each request by the drafter's calibrated
confidences: a row that takes lookup's block agreed with the drafter on its
first token, so slot 1's survival is the drafter's; past the agreement it is an
estimate of how far the text runs predictably at all. The online refinement of
the confidences leaves those rows out (their accepted counts are lookup's).

Why it stays lossless: the choice looks at the request's committed tokens, the
two proposals and the drafter's confidences only, never at the target's verdict
on this round, and
verification judges lookup's tokens exactly as it judges the drafter's (greedy:
each must equal the target's argmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LookupChoice:
    """The drafts of one round after the choice (R = drafting requests, K = block)."""

    tokens: np.ndarray  # [R, K] the drafts to verify (lookup's where `took`)
    max_lengths: np.ndarray  # [R] how many of them exist (lookup's length where `took`, else K)
    took: np.ndarray  # [R] bool: the row takes lookup's block


def choose(drafts: np.ndarray, lookup: np.ndarray, lookup_lengths: np.ndarray, eligible: np.ndarray,
           confidences: np.ndarray | None = None, max_confidence: float = 1.0) -> LookupChoice:
    """Per request, lookup's block or the drafter's (module doc).

    drafts [R, K] the drafter's tokens; lookup [R, K] lookup's, valid up to
    lookup_lengths [R] (0: no n-gram matched); eligible [R] bool (greedy rows);
    confidences [R, K] the drafter's calibrated c_k (None: no confidence head, no
    filter): lookup is taken only where c_k at the first slot where the two differ
    is below max_confidence."""
    K = drafts.shape[1]
    exists = np.arange(K) < lookup_lengths[:, None]
    agree = np.cumprod((lookup[:, :K] == drafts) & exists, axis=1).sum(axis=1)
    took = eligible & (agree >= 1) & (lookup_lengths > agree)
    if confidences is not None:  # lookup_lengths > agree, so agree < K where took
        took &= np.take_along_axis(confidences, np.minimum(agree, K - 1)[:, None], axis=1)[:, 0] < max_confidence
    tokens = np.where(took[:, None], lookup[:, :K], drafts)
    return LookupChoice(tokens, np.where(took, lookup_lengths, K).astype(np.int64), took)
