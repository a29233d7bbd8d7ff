"""Prompt lookup beside the drafter: the per-request choice and its options."""

import numpy as np
import pytest

from dspark_vllm.config import options_from_additional_config
from dspark_vllm.lookup import choose
from dspark_vllm.model.config import DSparkConfigError


def test_choice_per_request():
    drafts = np.array([[5, 6, 7, 8],    # lookup agrees on 2 and runs to 4: lookup
                       [5, 6, 7, 8],    # lookup agrees on all it has: drafter (it runs longer)
                       [5, 6, 7, 8],    # lookup disagrees at once: drafter
                       [5, 6, 7, 8],    # no n-gram matched: drafter
                       [5, 6, 7, 8],    # would take lookup, but samples: drafter
                       [5, 6, 7, 8]])   # agrees on 1, lookup has 3: lookup, verifies 3
    lookup = np.array([[5, 6, 1, 2],
                       [5, 6, 7, 9],    # the 9 is stale (beyond its length 3)
                       [4, 6, 7, 8],
                       [5, 6, 7, 8],    # stale: length 0
                       [5, 1, 2, 3],
                       [5, 9, 9, 5]])   # the last 5 is stale
    lengths = np.array([4, 3, 4, 0, 4, 3])
    eligible = np.array([True, True, True, True, False, True])
    choice = choose(drafts, lookup, lengths, eligible)
    assert choice.took.tolist() == [True, False, False, False, False, True]
    assert choice.tokens[0].tolist() == [5, 6, 1, 2] and choice.tokens[5][:3].tolist() == [5, 9, 9]
    assert (choice.tokens[1:5] == drafts[1:5]).all()
    assert choice.max_lengths.tolist() == [4, 4, 4, 4, 4, 3]


def test_full_agreement_keeps_the_drafter():
    """A lookup block equal to the drafter's adds nothing: the drafter's row stays."""
    drafts = np.array([[1, 2, 3]])
    choice = choose(drafts, drafts.copy(), np.array([3]), np.array([True]))
    assert not choice.took[0] and choice.max_lengths[0] == 3


def test_lookup_runs_past_the_drafters_block():
    """With num_speculative_tokens above the block size lookup proposes more than the
    drafter's K tokens: a row whose lookup agrees with the whole block and runs on takes
    it, and verifies past K where the policy verifies the whole block."""
    drafts = np.array([[5, 6, 7], [5, 6, 7], [5, 6, 7], [5, 6, 7]])
    lookup = np.array([[5, 6, 7, 8, 9],   # agrees on the whole block, runs to 5: lookup
                       [5, 6, 7, 8, 9],   # the same, but only 3 exist: the drafter's
                       [5, 6, 1, 2, 3],   # differs at slot 2 (c = 0.5): lookup
                       [5, 1, 2, 3, 4]])  # differs at slot 1 (c = 0.95): the drafter's
    lengths = np.array([5, 3, 5, 5])
    confidences = np.array([[0.99, 0.95, 0.5]] * 4)
    choice = choose(drafts, lookup, lengths, np.ones(4, bool), confidences, 0.9)
    assert choice.took.tolist() == [True, False, True, False]
    assert choice.max_lengths.tolist() == [5, 3, 5, 3] and choice.tokens.shape == (4, 5)
    assert choice.tokens[0].tolist() == [5, 6, 7, 8, 9] and choice.tokens[2].tolist() == [5, 6, 1, 2, 3]
    assert choice.tokens[3, :3].tolist() == [5, 6, 7]
    # the policy's lengths (0..K) cut to the proposal; a whole block runs on to lookup's end
    assert choice.verify_lengths(np.array([3, 3, 3, 3]), 3).tolist() == [5, 3, 5, 3]
    assert choice.verify_lengths(np.array([2, 1, 0, 2]), 3).tolist() == [2, 1, 0, 2]


@pytest.mark.parametrize("bad,field", [({"min_n": 0}, "prompt_lookup.min_n"),
                                       ({"min_n": 4, "max_n": 2}, "prompt_lookup.max_n"),
                                       ({"n": 3}, "prompt_lookup.n"),
                                       ({"max_confidence": 1.5}, "prompt_lookup.max_confidence")])
def test_malformed_lookup_options_name_the_field(bad, field):
    with pytest.raises(DSparkConfigError, match=field.replace(".", r"\.")):
        options_from_additional_config({"dspark": {"draft_model": "/x", "prompt_lookup": bad}})
    options = options_from_additional_config({"dspark": {"draft_model": "/x", "prompt_lookup": {}}})
    lookup = options.prompt_lookup
    assert (lookup.min_n, lookup.max_n, lookup.max_confidence) == (2, 4, 0.9)
    assert options_from_additional_config({"dspark": {"draft_model": "/x"}}).prompt_lookup is None


def test_confident_drafter_keeps_its_block():
    """With confidences, lookup is taken only where the drafter's c_k at the first slot
    where the two differ is below max_confidence."""
    drafts = np.array([[5, 6, 7], [5, 6, 7]])
    lookup = np.array([[5, 1, 2], [5, 6, 2]])
    lengths = np.array([3, 3])
    confidences = np.array([[0.99, 0.95, 0.5],    # differ at slot 1: c = 0.95, confident
                            [0.99, 0.95, 0.5]])   # differ at slot 2: c = 0.5, unsure
    choice = choose(drafts, lookup, lengths, np.array([True, True]), confidences, 0.9)
    assert choice.took.tolist() == [False, True]
    assert choose(drafts, lookup, lengths, np.array([True, True]), confidences, 1.0).took.all()


def test_compiled_rule_matches_a_vectorized_statement_of_it():
    """The loop (numba-compiled where numba exists, and as plain Python) against the
    rule written as array operations, on random proposals."""
    from dspark_vllm import lookup

    rng = np.random.default_rng(0)
    R, K, W = 400, 7, 10  # lookup proposes up to W > K tokens (num_speculative_tokens 10)
    drafts = rng.integers(0, 3, size=(R, K))
    found = rng.integers(0, 3, size=(R, W))
    found[:, :K] = np.where(rng.random((R, K)) < 0.7, drafts, found[:, :K])
    lengths = rng.integers(0, W + 1, size=R)
    eligible = rng.random(R) < 0.8
    confidences = rng.random((R, K))
    exists = np.arange(K) < lengths[:, None]
    agree = np.cumprod((found[:, :K] == drafts) & exists, axis=1).sum(axis=1)
    at_difference = confidences[np.arange(R), np.minimum(agree, K - 1)]
    expected = eligible & (agree >= 1) & (lengths > agree) & ((agree == K) | (at_difference < 0.6))
    assert 20 < expected.sum() < R - 20  # both outcomes well represented
    assert ((agree == K) & expected).sum() > 5  # and lookup running past a block it agrees with
    choice = choose(drafts, found, lengths, eligible, confidences, 0.6)
    assert (choice.took == expected).all()
    assert (choice.max_lengths == np.where(expected, lengths, K)).all()
    for r in range(R):
        n = choice.max_lengths[r]
        assert (choice.tokens[r, :n] == (found if expected[r] else drafts)[r, :n]).all()
    python_rows = lookup._choose_rows  # the uncompiled loop
    tokens, max_lengths, took = np.zeros((R, W), dtype=drafts.dtype), np.empty(R, dtype=np.int64), np.empty(R, bool)
    python_rows(drafts, found, lengths, eligible, confidences, 0.6, tokens, max_lengths, took)
    assert (took == expected).all() and (max_lengths == choice.max_lengths).all()
    assert (tokens == choice.tokens).all()


def test_online_refinement_leaves_out_rows_that_took_lookup():
    """Rows that verified lookup's block say nothing of the confidence head: the online
    STS window takes only the drafter's rows (DSparkProposer.record_verification)."""
    import torch

    from dspark_vllm.metrics import EngineStats
    from dspark_vllm.refinement import OnlineCalibration
    from dspark_vllm.vllm_integration import PLACEHOLDER, DraftRound, DSparkProposer

    K = 3
    proposer = DSparkProposer.__new__(DSparkProposer)  # the counters' state only, no engine
    proposer.num_tokens = proposer.max_draft_tokens = K
    proposer.verifying, proposer.offline_maps, proposer.guard = None, None, None
    proposer.stats = EngineStats("fixed", K)
    proposer.online = OnlineCalibration(np.ones(K), every=1024, window=64, max_change=0.25)
    proposer.round = DraftRound(["a", "b", "c"], [1, 2, 3], np.array([5, 6, 7]), torch.zeros(3, K, dtype=torch.long),
                                None, torch.zeros(3, K), took_lookup=np.array([False, True, False]))
    output = torch.tensor([[4, 4, 4, 4], [4, 4, PLACEHOLDER, PLACEHOLDER], [4, PLACEHOLDER, PLACEHOLDER, PLACEHOLDER]])
    proposer.record_verification(["a", "b", "c"], [3, 3, 3], output)
    assert proposer.online.filled == 2  # rows a and c
    assert proposer.stats.accepted.tolist() == [2, 1, 1]  # the counters still count every row
