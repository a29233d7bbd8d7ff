"""Tests for dspark_vllm.verification: exact greedy cases and statistical exactness."""
import pytest
import torch
from scipy.stats import chisquare

from dspark_vllm.verification import (
    PLACEHOLDER,
    accept_probs,
    num_accepted,
    race_sample,
    residual,
    verify,
    verify_greedy,
    verify_greedy_uniform,
)

NEG = float("-inf")
N = 200_000  # samples per statistical test


def one_hot_logits(tok, vocab=8):
    """Logits whose softmax puts all mass on tok."""
    row = torch.full((vocab,), NEG)
    row[tok] = 0.0
    return row


def dist(gen, vocab, scale):
    """Random distribution: scale 3 is peaky, 0.3 is flat."""
    return (torch.randn(vocab, generator=gen) * scale).softmax(-1)


def chi2(samples, probs):
    """(p-value, TV distance) of samples against probs; bins with expected < 5 merged."""
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() / probs.double().sum() * samples.numel()
    small = expected < 5
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum(0, keepdim=True)])
        expected = torch.cat([expected[~small], expected[small].sum(0, keepdim=True)])
    tv = 0.5 * (counts - expected).abs().sum().item() / samples.numel()
    return chisquare(counts.numpy(), expected.numpy()).pvalue, tv


def one_position(p, x, draft_probs):
    """verify() output [N, 2] for N one-draft requests with target p and drafts x."""
    vocab = p.numel()
    logits = torch.stack([p.log(), torch.zeros(vocab)]).repeat(N, 1)
    return verify(logits, x, [1] * N, torch.zeros(N, dtype=torch.bool), draft_probs)


def accept_rate(out):
    return num_accepted(out).double().mean().item()


# ---------------------------------------------------------------- helpers

def test_helpers():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.25, 0.6, 0.15])
    ap = accept_probs(p, q)
    assert torch.allclose(ap, torch.tensor([1.0, 0.5, 1.0]))
    assert accept_probs(torch.tensor([0.3]), torch.tensor([0.0])).item() == 0.0
    assert torch.allclose(residual(p, q), torch.tensor([0.25, 0.0, 0.05]) / 0.3)
    assert torch.equal(residual(p, p), p)  # residual mass 0 -> fall back to p
    w = torch.tensor([[0.0, 1.0, 0.0]]).repeat(5, 1)
    assert race_sample(w, torch.empty(5, 3).exponential_()).eq(1).all()


# ---------------------------------------------------------------- greedy

def greedy_batch(argmaxes, drafts_per_req, vocab=8):
    logits = torch.stack([torch.arange(vocab).eq(t) * 5.0 for t in argmaxes])
    drafts = torch.tensor([d for ds in drafts_per_req for d in ds], dtype=torch.long)
    num_draft = [len(ds) for ds in drafts_per_req]
    out = verify(logits, drafts, num_draft, torch.ones(len(num_draft), dtype=torch.bool))
    fast = verify_greedy(logits, drafts, torch.tensor(num_draft), max(num_draft))
    assert torch.equal(fast, out)  # the serving fast path agrees with the general verifier
    if len(set(num_draft)) == 1:
        assert torch.equal(verify_greedy_uniform(logits, drafts, num_draft[0]), out)
    return out


def test_greedy_prefix_correction_bonus():
    # req0: argmax rows 1,2,3 | bonus 4; drafts 1,2,7 -> accept 2, correct with 3
    # req1: argmax 5,6 | bonus 0; drafts 5,6 -> accept all, bonus 0
    # req2: no drafts, bonus argmax 2
    # req3: placeholder draft is rejected even if argmax is 0
    out = greedy_batch([1, 2, 3, 4, 5, 6, 0, 2, 0, 7], [[1, 2, 7], [5, 6], [], [-1]])
    expected = torch.tensor([[1, 2, 3, -1], [5, 6, 0, -1], [2, -1, -1, -1], [0, -1, -1, -1]])
    assert out.dtype == torch.int64 and torch.equal(out, expected)
    assert num_accepted(out).tolist() == [2, 2, 0, 0]


def test_greedy_first_mismatch_stops():
    out = greedy_batch([1, 2, 3, 4], [[0, 2, 3]])  # first draft wrong: later matches ignored
    assert out.tolist() == [[1, -1, -1, -1]]


def test_no_drafts_at_all():
    out = greedy_batch([3, 1], [[], []])
    assert out.tolist() == [[3], [1]]


def test_verify_greedy_equals_verify_on_random_batches():
    """The all-greedy fast path (one argmax, no float32 copies) against the general
    verifier on random batches: ragged lengths, requests without drafts, drafts that
    mostly match the argmax (so long prefixes are accepted), bf16 logits."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        n, V = int(torch.randint(1, 9, (1,), generator=gen)), 16
        num_draft = torch.randint(0, 8, (n,), generator=gen).tolist()
        logits = torch.randn(sum(num_draft) + n, V, generator=gen).to(torch.bfloat16 if trial % 2 else torch.float32)
        argmax = logits.argmax(-1)
        rows = [r + i for i, k in enumerate(num_draft) for r in range(sum(num_draft[:i]), sum(num_draft[:i]) + k)]
        hit = torch.rand(len(rows), generator=gen) < 0.8
        drafts = torch.where(hit, argmax[rows], torch.randint(0, V, (len(rows),), generator=gen))
        expected = verify(logits, drafts, num_draft, torch.ones(n, dtype=torch.bool))
        got = verify_greedy(logits, drafts, torch.tensor(num_draft), max(num_draft))
        assert torch.equal(got, expected), (num_draft, got, expected)


def test_verify_greedy_uniform_equals_verify_on_random_batches():
    """The equal-lengths fast path (a reshape instead of index arithmetic) against the
    general verifier: every request verifies L drafts, L from 1 to 7."""
    gen = torch.Generator().manual_seed(1)
    for trial in range(200):
        n, L, V = int(torch.randint(1, 9, (1,), generator=gen)), int(torch.randint(1, 8, (1,), generator=gen)), 16
        logits = torch.randn(n * (L + 1), V, generator=gen).to(torch.bfloat16 if trial % 2 else torch.float32)
        argmax = logits.argmax(-1).view(n, L + 1)[:, :L].flatten()
        hit = torch.rand(n * L, generator=gen) < 0.8
        drafts = torch.where(hit, argmax, torch.randint(0, V, (n * L,), generator=gen)).to(torch.int32)
        expected = verify(logits, drafts.long(), [L] * n, torch.ones(n, dtype=torch.bool))
        got = verify_greedy_uniform(logits, drafts, L)
        assert got.dtype == torch.int64 and torch.equal(got, expected), (L, got, expected)


def test_mixed_batch():
    """num_draft [3, 0, 2, 5, 1], greedy requests 0 and 2, random ones set up to be deterministic."""
    V, rows, drafts, probs = 8, [], [], []
    # req0 greedy: argmax 1, 2, 3 | 4; drafts 1, 2, 5 -> [1, 2, 3]
    rows += [torch.arange(V).eq(t) * 1.0 for t in (1, 2, 3, 4)]
    drafts += [1, 2, 5]
    probs += [torch.full((V,), 1.0 / V)] * 3
    # req1 random, no drafts, bonus p = one-hot(5) -> [5]
    rows += [one_hot_logits(5)]
    # req2 greedy: argmax 6, 7 | 0; drafts 6, 7 -> [6, 7, 0]
    rows += [torch.arange(V).eq(t) * 1.0 for t in (6, 7, 0)]
    drafts += [6, 7]
    probs += [torch.full((V,), 1.0 / V)] * 2
    # req3 random: p one-hot at drafts 1, 2, 3 (q one-hot; row 0 all-zero = deterministic),
    # 4th draft 4 has p(4) = 0 -> rejected, residual = p = one-hot(6) -> [1, 2, 3, 6]
    rows += [one_hot_logits(t) for t in (1, 2, 3, 6, 0, 0)]
    drafts += [1, 2, 3, 4, 0]
    probs += [torch.zeros(V)] + [torch.eye(V)[t] for t in (2, 3)] + [torch.eye(V)[4], torch.eye(V)[0]]
    # req4 random: placeholder draft -> rejected, residual = p = one-hot(3) -> [3]
    rows += [one_hot_logits(3), one_hot_logits(2)]
    drafts += [-1]
    probs += [torch.zeros(V)]
    greedy = torch.tensor([True, False, True, False, False])
    args = (torch.stack(rows), torch.tensor(drafts), [3, 0, 2, 5, 1], greedy)
    expected = torch.tensor([
        [1, 2, 3, -1, -1, -1],
        [5, -1, -1, -1, -1, -1],
        [6, 7, 0, -1, -1, -1],
        [1, 2, 3, 6, -1, -1],
        [3, -1, -1, -1, -1, -1],
    ])
    for dp in (torch.stack(probs), None):
        torch.manual_seed(0)
        assert torch.equal(verify(*args, draft_probs=dp), expected)
    assert num_accepted(expected).tolist() == [2, 0, 2, 3, 0]


# ---------------------------------------------------------------- exactness

@pytest.mark.parametrize("scale", [3.0, 0.3])
@pytest.mark.parametrize("vocab", [8, 20])
def test_first_token_is_p(scale, vocab):
    gen = torch.Generator().manual_seed(vocab + int(scale * 10))
    p, q = dist(gen, vocab, scale), dist(gen, vocab, scale)
    torch.manual_seed(1)
    x = torch.multinomial(q, N, replacement=True)
    out = one_position(p, x, q.expand(N, vocab))
    pval, tv = chi2(out[:, 0], p)
    assert pval > 1e-3 and tv < 0.01
    assert abs(accept_rate(out) - torch.minimum(p, q).sum().item()) < 0.006  # ~5 sigma


@pytest.mark.parametrize("scale", [3.0, 0.3])
def test_deterministic_draft_first_token_is_p(scale):
    gen = torch.Generator().manual_seed(7)
    p, q = dist(gen, 12, scale), dist(gen, 12, scale)
    torch.manual_seed(2)
    x = q.argmax().repeat(N)
    for dp in (None, torch.zeros(N, 12)):  # None and all-zero rows both mean one-hot q
        out = one_position(p, x, dp)
        pval, tv = chi2(out[:, 0], p)
        assert pval > 1e-3 and tv < 0.01
        assert abs(accept_rate(out) - p[q.argmax()].item()) < 0.006


def test_two_position_chain_joint():
    """x1 ~ q0, x2 ~ q1[x1]; the first two emitted tokens must follow p0(a) p1[a](b)."""
    V, gen = 8, torch.Generator().manual_seed(3)
    p0, q0 = dist(gen, V, 1.5), dist(gen, V, 1.5)
    p1 = torch.stack([dist(gen, V, 1.5) for _ in range(V)])
    q1 = torch.stack([dist(gen, V, 1.5) for _ in range(V)])
    torch.manual_seed(4)
    x1 = torch.multinomial(q0, N, replacement=True)
    x2 = torch.multinomial(q1[x1], 1).squeeze(1)
    logits = torch.stack([p0.log().expand(N, V), p1[x1].log(), torch.zeros(N, V)], 1).reshape(-1, V)
    probs = torch.stack([q0.expand(N, V), q1[x1]], 1).reshape(-1, V)
    drafts = torch.stack([x1, x2], 1).reshape(-1)
    out = verify(logits, drafts, [2] * N, torch.zeros(N, dtype=torch.bool), probs)
    y1, y2 = out[:, 0], out[:, 1].clone()
    # Requests that stopped after one token: the next step samples from p1[y1] (a bonus row).
    short = y2 == PLACEHOLDER
    m = int(short.sum())
    nxt = verify(p1[y1[short]].log(), torch.empty(0, dtype=torch.long), [0] * m, torch.zeros(m, dtype=torch.bool))
    y2[short] = nxt[:, 0]
    pval, tv = chi2(y1 * V + y2, (p0[:, None] * p1).reshape(-1))
    assert pval > 1e-3 and tv < 0.01
    assert 0 < m < N  # both paths exercised


# ---------------------------------------------------------------- power

def test_sampled_draft_verified_as_one_hot_is_still_exact():
    """Drafts x ~ q verified with draft_probs=None (q taken as one-hot(x)).

    This is NOT a bug: given any x, accepting with p(x) and otherwise sampling
    p with x removed emits y with probability p(y), whatever distribution x came
    from. It only costs acceptance rate (sum q p instead of sum min(p, q)).
    """
    gen = torch.Generator().manual_seed(11)
    p, q = dist(gen, 10, 1.5), dist(gen, 10, 1.5)
    torch.manual_seed(5)
    x = torch.multinomial(q, N, replacement=True)
    out = one_position(p, x, None)
    pval, tv = chi2(out[:, 0], p)
    assert pval > 1e-3 and tv < 0.01
    assert abs(accept_rate(out) - (p * q).sum().item()) < 0.006  # lower than sum min(p, q)


@pytest.mark.parametrize("variant", ["argmax_draft_claims_q", "wrong_temperature_q"])
def test_broken_variants_detected(variant):
    """Reporting a q that is not the distribution the draft came from breaks exactness; the chi-square must see it."""
    gen = torch.Generator().manual_seed(12)
    logits_q = torch.randn(10, generator=gen) * 1.5
    p, q = dist(gen, 10, 1.5), logits_q.softmax(-1)
    torch.manual_seed(6)
    if variant == "argmax_draft_claims_q":  # greedy drafter, but its softmax passed as draft_probs
        x, claimed = q.argmax().repeat(N), q
    else:  # drafts sampled at temperature 0.5, probs reported at temperature 1
        x, claimed = torch.multinomial((logits_q / 0.5).softmax(-1), N, replacement=True), q
    pval, tv = chi2(one_position(p, x, claimed.expand(N, 10))[:, 0], p)
    assert pval < 1e-6 and tv > 0.02


# ---------------------------------------------------------------- seeding

def random_batch(num_draft, vocab=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(num_draft)
    logits = torch.randn(total + len(num_draft), vocab, generator=gen) * 0.3
    probs = (torch.randn(total, vocab, generator=gen) * 0.3).softmax(-1)
    drafts = torch.multinomial(probs, 1, generator=gen).squeeze(1) if total else torch.empty(0, dtype=torch.long)
    return logits, drafts, probs


def test_seeded_requests_independent_of_batch():
    num_draft = [2, 3, 0, 4]
    logits, drafts, probs = random_batch(num_draft)
    greedy = torch.zeros(4, dtype=torch.bool)
    gens = lambda: {1: torch.Generator().manual_seed(123), 3: torch.Generator().manual_seed(456)}
    torch.manual_seed(0)
    batched = verify(logits, drafts, num_draft, greedy, probs, gens())
    torch.manual_seed(99)  # different global RNG state must not matter for seeded rows
    again = verify(logits, drafts, num_draft, greedy, probs, gens())
    assert torch.equal(batched[[1, 3]], again[[1, 3]])
    # Alone: request r's slice of every input, with the same seed.
    row0, d0 = [0, 3, 7, 8], [0, 2, 5, 5]  # first target row / first draft per request
    for r, seed in ((1, 123), (3, 456)):
        k = num_draft[r]
        alone = verify(
            logits[row0[r]:row0[r] + k + 1], drafts[d0[r]:d0[r] + k], [k],
            torch.zeros(1, dtype=torch.bool), probs[d0[r]:d0[r] + k], {0: torch.Generator().manual_seed(seed)},
        )[0]
        assert torch.equal(batched[r, :k + 1], alone) and (batched[r, k + 1:] == PLACEHOLDER).all()
    # Seeds matter: 20 different seeds do not all give the same output.
    outs = {tuple(verify(logits, drafts, num_draft, greedy, probs, {3: torch.Generator().manual_seed(s)})[3].tolist())
            for s in range(20)}
    assert len(outs) > 1


# ---------------------------------------------------------------- bad input

def test_bad_shapes():
    num_draft = [2, 1]
    logits, drafts, probs = random_batch(num_draft, vocab=6)
    greedy = torch.zeros(2, dtype=torch.bool)
    with pytest.raises(ValueError, match="is_greedy"):
        verify(logits, drafts, num_draft, torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="draft_token_ids"):
        verify(logits, drafts[:2], num_draft, greedy)
    with pytest.raises(ValueError, match="target_logits"):
        verify(logits[:-1], drafts, num_draft, greedy)
    with pytest.raises(ValueError, match="draft_probs"):
        verify(logits, drafts, num_draft, greedy, probs[:, :5])
    with pytest.raises(ValueError, match="num_draft"):
        verify(logits, drafts, [4, -1], greedy)
    with pytest.raises(ValueError, match="generators"):
        verify(logits, drafts, num_draft, greedy, probs, {5: torch.Generator()})


def test_empty_batch_and_bf16():
    empty = verify(torch.zeros(0, 5), torch.empty(0, dtype=torch.long), [], torch.zeros(0, dtype=torch.bool))
    assert empty.shape == (0, 1) and empty.dtype == torch.int64
    logits, drafts, probs = random_batch([2, 0, 3], vocab=6)
    torch.manual_seed(0)
    out = verify(logits.bfloat16(), drafts, [2, 0, 3], torch.tensor([False, True, False]), probs.bfloat16())
    assert out.shape == (3, 4) and out.dtype == torch.int64
    assert ((out >= 0) | (out == PLACEHOLDER)).all() and (out[:, 0] >= 0).all()


def test_greedy_tokens_is_argmax_with_its_tie_rule():
    """greedy_tokens (torch.max's indices, faster on the CPU) picks argmax's token, the
    first maximum, also on rows full of ties, in float32 and bf16."""
    from dspark_vllm.sampling import greedy_tokens

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        tied = torch.randint(0, 3, (512, 64), generator=gen).to(dtype)
        smooth = torch.randn(512, 2048, generator=gen).to(dtype)
        for x in (tied, smooth):
            assert torch.equal(greedy_tokens(x), x.argmax(-1))


def test_the_fast_greedy_path_is_taken_only_when_the_raw_argmax_decides():
    """_argmax_decides routes a batch to verify_greedy: all greedy, and no penalty, bad word,
    allowed-token mask, active logit bias or min-tokens, other logits processor or logprobs."""
    from types import SimpleNamespace

    import torch
    from vllm.v1.sample.logits_processor import LogitBiasLogitsProcessor, MinTokensLogitsProcessor

    from dspark_vllm.vllm_integration import _argmax_decides

    bias = LogitBiasLogitsProcessor(None, torch.device("cpu"), False)
    min_tokens = MinTokensLogitsProcessor(None, torch.device("cpu"), False)

    def metadata(**changes):
        plain = dict(all_greedy=True, no_penalties=True, allowed_token_ids_mask=None, bad_words_token_ids={},
                     max_num_logprobs=None, logprob_token_ids=None,
                     logitsprocs=SimpleNamespace(non_argmax_invariant=[bias, min_tokens]))
        return SimpleNamespace(**{**plain, **changes})

    assert _argmax_decides(metadata())  # idle bias and min-tokens processors move nothing
    assert not _argmax_decides(metadata(all_greedy=False))
    assert not _argmax_decides(metadata(no_penalties=False))
    assert not _argmax_decides(metadata(allowed_token_ids_mask=torch.zeros(1, 4, dtype=torch.bool)))
    assert not _argmax_decides(metadata(bad_words_token_ids={0: [[5]]}))
    assert not _argmax_decides(metadata(max_num_logprobs=0))
    assert not _argmax_decides(metadata(logprob_token_ids={0: [1]}))
    assert not _argmax_decides(metadata(logitsprocs=SimpleNamespace(non_argmax_invariant=[object()])))
    bias.biases[0] = {3: 1.0}
    assert not _argmax_decides(metadata())
    bias.biases.clear()
    min_tokens.min_toks[0] = (4, [], {7}, False)
    assert not _argmax_decides(metadata())
