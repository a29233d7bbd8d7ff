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

Replayed offline along the default pair's greedy answers of 128 tokens
(`scripts/replay_drafts.py`, float32, lookup up to 7 tokens): on 128 calibration
prompts, where the threshold was chosen, 4.24 tokens a step against the drafter's
3.76 (4.20 without the confidence test); on 64 held-out prompts 4.48 against 4.27
(lookup alone: 2.51; the better of the two at every step, which needs the answer:
4.90). Over the first 64 tokens of the same answers, which repeat themselves
less, the gain is smaller: 3.67 against 3.46 and 3.76 against 3.73.

Lookup proposes up to num_speculative_tokens tokens and often fewer; a row that
takes it verifies at most as many (`LookupChoice.verify_lengths`). With prompt
lookup on, num_speculative_tokens may exceed the drafter's block (engine_kwargs sets 23 for
block 7): the drafter still drafts its K tokens, and a row whose lookup agrees
with all K of them and runs on takes lookup's longer block. At one request a step
verifying 24 tokens costs about what one verifying 8 does, and copied stretches
run long: on the calibration prompts' answers of 128 tokens the replay gives
4.24 tokens a step with lookup up to 7 tokens, 4.88 up to 15, 5.10 up to 23 and
5.23 up to 31.

Only greedy requests take lookup's block. A sampled request verifies its drafts
against q rows, the drafter's own distributions (`Drafts.probs`), which do not
describe a lookup token.

The verification policy still judges each request by the drafter's calibrated
confidences: a row that takes lookup's block agreed with the drafter on its
first token, so slot 1's survival is the drafter's; past the agreement it is an
estimate of how far the text runs predictably at all. Past the drafter's block
there are no confidences: a row the policy verifies whole runs on to the end of
lookup's block (`LookupChoice.verify_lengths`). The online refinement of the
confidences leaves those rows out (their accepted counts are lookup's).

Why it stays lossless: the choice looks at the request's committed tokens, the
two proposals and the drafter's confidences only, never at the target's verdict
on this round, and verification judges lookup's tokens exactly as it judges the
drafter's (greedy: each must equal the target's argmax).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


@dataclass
class LookupChoice:
    """The drafts of one round after the choice (R = drafting requests, K = drafter's
    tokens, W >= K = lookup's widest proposal)."""

    tokens: np.ndarray  # [R, W] the drafts to verify (lookup's where `took`, else the drafter's K)
    max_lengths: np.ndarray  # [R] how many of them exist (lookup's length where `took`, else K)
    took: np.ndarray  # [R] bool: the row takes lookup's block

    def verify_lengths(self, policy: np.ndarray, K: int) -> np.ndarray:
        """How many drafts each row verifies: the policy's length (0..K, from the drafter's
        confidences) cut to the chosen proposal's length, except that a row the policy
        verifies whole runs on to the end of lookup's proposal, which may be longer than
        the drafter's K (num_speculative_tokens > block_size). Past the drafter's block
        there are no confidences to judge by."""
        return np.where(policy >= K, self.max_lengths, np.minimum(policy, self.max_lengths))


def _choose_rows(drafts, lookup, lookup_lengths, eligible, confidences, max_confidence,
                 tokens, max_lengths, took):
    R, K = drafts.shape
    for r in range(R):
        tokens[r, :K] = drafts[r]
        max_lengths[r], took[r] = K, False
        n = lookup_lengths[r]
        if not eligible[r] or n == 0 or lookup[r, 0] != drafts[r, 0]:
            continue  # no n-gram, a sampled row, or lookup disagrees at once
        agree = 1  # slots where the two proposals agree
        while agree < min(n, K) and lookup[r, agree] == drafts[r, agree]:
            agree += 1
        if agree == n:
            continue  # lookup ends inside the agreement
        if agree < K and confidences[r, agree] >= max_confidence:
            continue  # the drafter is sure where the two differ
        tokens[r, :n] = lookup[r, :n]  # (agree == K: lookup runs on past the drafter's whole block)
        max_lengths[r], took[r] = n, True


def choose(drafts: np.ndarray, lookup: np.ndarray, lookup_lengths: np.ndarray, eligible: np.ndarray,
           confidences: np.ndarray | None = None, max_confidence: float = 1.0) -> LookupChoice:
    """Per request, lookup's block or the drafter's (module doc).

    drafts [R, K] the drafter's tokens; lookup [R, W >= K] lookup's, valid up to
    lookup_lengths [R] (0: no n-gram matched; W = num_speculative_tokens, which prompt
    lookup lets exceed the drafter's block); eligible [R] bool (greedy rows);
    confidences [R, K] the drafter's calibrated c_k (None: no confidence head, no
    filter): lookup is taken only where c_k at the first slot where the two differ
    is below max_confidence."""
    R, K = drafts.shape
    if confidences is None:
        confidences = np.zeros((R, K))  # below any max_confidence (> 0)
    tokens = np.zeros((R, max(K, lookup.shape[1])), dtype=drafts.dtype)
    max_lengths, took = np.empty(R, dtype=np.int64), np.empty(R, dtype=bool)
    choose_rows = _compiled_choose_rows()
    choose_rows(drafts, lookup, lookup_lengths, eligible, confidences, float(max_confidence),
                tokens, max_lengths, took)
    return LookupChoice(tokens, max_lengths, took)


@functools.cache
def _compiled_choose_rows():
    """`_choose_rows` compiled by numba where numba is installed (it comes with vLLM): in the
    serving step a dozen numpy operations on a few rows cost about 90 us, the compiled loop a
    few. Plain Python elsewhere (training installs without vLLM), with the same results.
    Compiled at the first call, not at import: vLLM's CPU worker must start before numba is
    imported (vllm_integration._dspark_prompt_lookup)."""
    try:
        import numba
    except ImportError:
        return _choose_rows
    return numba.njit(cache=True)(_choose_rows)
