"""DSpark at the edges of a request: the end of the context, max_tokens, stops,
preemption and prefix caching, in real vLLM engines on the CPU.

Every test compares greedy output token for token with plain decoding under
the same engine settings (fp32, max_model_len 512, prefix caching on). They
run the embedded default pair (a trained code model and its DSpark drafter):
its drafts are accepted several tokens at a time, so a limit or a stop really
lands inside an accepted block. (The random-weight fixture drafter is almost
never accepted: with it these cases would never arise.)
"""


import numpy as np
import pytest

from engine_utils import COMMON, close, generate

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = COMMON["max_model_len"]  # 512
BLOCK = 7  # the default pair's draft block size
SETTINGS = dict(COMMON, enable_prefix_caching=True)


# -- engines and prompts ------------------------------------------------------

@pytest.fixture(scope="module")
def pair():
    from dspark_vllm import demo_paths

    return demo_paths()


@pytest.fixture(scope="module")
def tok(pair):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(pair["target"])


@pytest.fixture(scope="module")
def code(pair, tok):
    """Held-out code: 24 prompts of at most 120 tokens, and a long token stream (the other files)."""
    from dspark_vllm.prompts import load_turns

    turns = load_turns(pair["prompts"], 64)  # the first 64 held-out prompts
    prompts = [tok(t).input_ids[:120] for t in turns[:24]]
    stream = tok("".join(turns[24:])).input_ids
    assert len(stream) > 1300
    return prompts, stream


@pytest.fixture(scope="module")
def plain(pair):
    from vllm import LLM

    llm = LLM(model=pair["target"], **SETTINGS)
    yield llm
    close(llm)


@pytest.fixture(scope="module")
def dspark(pair):
    """`fixed` verification without a cost profile: every step drafts a whole block."""
    import dspark_vllm
    from vllm import LLM

    llm = LLM(model=pair["target"], **dspark_vllm.engine_kwargs(pair["dspark"]), **SETTINGS,
              per_request_spec_decode_metrics="detailed")
    yield llm
    close(llm)


def token_ids(outs):
    return [tuple(o.outputs[0].token_ids) for o in outs]


def counter(llm, name):
    """A counter of vLLM's metrics. vLLM keeps them in one process-wide Prometheus
    registry and each new engine replaces the previous one's collectors: this reads
    the most recently built engine of the process, whatever `llm` is."""
    return sum(m.value for m in llm.get_metrics() if m.name == name)


def step_sizes(out) -> list[int]:
    """Tokens the engine emitted per step for a request that drafted in every step:
    1 from its prefill, then accepted + 1 per verification (vLLM's detailed metrics,
    counted before the scheduler trims a step's tokens at a limit or a stop)."""
    return [1] + [a + 1 for a in out.outputs[0].spec_decode_metrics.per_step_accepted]


def greedy(**kw):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, **kw)


# -- the end of the context ---------------------------------------------------

def test_prompts_that_nearly_fill_max_model_len(plain, dspark, code):
    """Prompts with 24 down to 1 free positions before max_model_len, asking for 64 tokens:
    each stops exactly at the end of the context, without an error, and equals plain
    decoding. The plugin drafts for a request exactly as long as its whole block
    [anchor, mask...] fits before max_model_len (`_dspark_anchors`): the anchors of
    every request cross that line, and from 506 tokens on a prompt never drafts."""
    _, stream = code
    lengths = range(MAX_MODEL_LEN - 24, MAX_MODEL_LEN)
    prompts = [stream[13 * i: 13 * i + n] for i, n in enumerate(lengths)]
    params = greedy(max_tokens=64, ignore_eos=True)
    got = generate(dspark, prompts, params)
    assert token_ids(got) == token_ids(generate(plain, prompts, params))
    last_fitting_anchor = MAX_MODEL_LEN - BLOCK  # block at positions 505..511
    for n, out in zip(lengths, got):
        assert len(out.outputs[0].token_ids) == MAX_MODEL_LEN - n
        assert out.outputs[0].finish_reason == "length"
        # Anchor position of each verified round (the first sampled token sits at
        # position n), then of the first round not drafted: the request drafted
        # exactly as long as its block fitted.
        anchors = n + np.cumsum([0] + step_sizes(out)[1:])
        assert (anchors[:-1] <= last_fitting_anchor).all() and anchors[-1] > last_fitting_anchor, (n, anchors)
    # drafts were verified and accepted on the way to the end of the context
    assert sum(sum(o.outputs[0].spec_decode_metrics.per_step_accepted) for o in got) > 0


# -- max_tokens ---------------------------------------------------------------

def test_max_tokens_ending_inside_a_block(plain, dspark, code):
    """max_tokens 1..9 and 13 on four prompts in one batch: the output has exactly
    max_tokens tokens and equals plain decoding, also where the step that reached
    max_tokens had accepted more tokens (the engine trims them)."""
    prompts, _ = code
    limits = [1, 2, 3, 4, 5, 6, 7, 8, 9, 13]
    batch = [(p, m) for p in prompts[:4] for m in limits]
    params = [greedy(max_tokens=m, ignore_eos=True) for _, m in batch]
    got = generate(dspark, [p for p, _ in batch], params)
    assert token_ids(got) == token_ids(generate(plain, [p for p, _ in batch], params))
    cut_inside_block = 0
    for (_, m), out in zip(batch, got):
        assert len(out.outputs[0].token_ids) == m
        emitted = sum(step_sizes(out))
        assert emitted >= m
        cut_inside_block += emitted > m
    print(f"\n{cut_inside_block} of {len(batch)} requests reached max_tokens inside an accepted block")
    assert cut_inside_block >= 5, "too few accepted blocks crossed max_tokens to test anything"


# -- stops --------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(plain, dspark, code, tok):
    """Eight prompts, 48 tokens, no stop: DSpark's output (= plain's), its text and, per
    output token, whether it was accepted inside a block rather than ending its step."""
    prompts, _ = code
    prompts = prompts[:8]
    params = greedy(max_tokens=48, ignore_eos=True)
    outs = generate(dspark, prompts, params)
    assert token_ids(outs) == token_ids(generate(plain, prompts, params))
    refs = []
    for p, out in zip(prompts, outs):
        ids = list(out.outputs[0].token_ids)
        ends, total = set(), 0
        for size in step_sizes(out):
            total += size
            ends.add(total - 1)  # index of the last token of each step
        inside = [i not in ends for i in range(len(ids))]
        refs.append(dict(prompt=p, ids=ids, text=out.outputs[0].text, inside=inside))
    return refs


def stop_string_inside_a_block(ref, tok, length=4):
    """A stop string of `length` characters whose first occurrence in the output ends with
    a token accepted inside a block (not the step's last token), or None."""
    ids, text = ref["ids"], ref["text"]
    if tok.decode(ids) != text:
        return None
    for j in range(1, len(ids)):
        end = len(tok.decode(ids[: j + 1]))
        s = text[max(0, end - length): end]
        if ref["inside"][j] and len(s) == length and s.strip() and text.find(s) + length == end \
                and len(tok.decode(ids[:j])) < end:
            return s
    return None


def test_stop_strings_inside_accepted_blocks(plain, dspark, reference, tok):
    """A stop string that completes in the middle of an accepted block ends the output
    there: text, token ids, finish and stop reasons equal plain decoding's."""
    from vllm import SamplingParams

    cases = [(r["prompt"], s) for r in reference if (s := stop_string_inside_a_block(r, tok))]
    assert len(cases) >= 4, "too few stop strings inside accepted blocks"
    print(f"\nstop strings inside accepted blocks: {[s for _, s in cases]}")
    prompts = [p for p, _ in cases]
    params = [SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, stop=[s]) for _, s in cases]
    got, expected = generate(dspark, prompts, params), generate(plain, prompts, params)
    for (_, s), g, e in zip(cases, got, expected):
        g, e = g.outputs[0], e.outputs[0]
        assert (g.text, tuple(g.token_ids), g.finish_reason, g.stop_reason) == \
               (e.text, tuple(e.token_ids), e.finish_reason, e.stop_reason)
        assert g.finish_reason == "stop" and g.stop_reason == s and s not in g.text
        assert len(g.token_ids) < 48


def test_stop_token_ids_inside_accepted_blocks(plain, dspark, reference):
    """A stop token accepted in the middle of a block ends the output at that token:
    token ids, text, finish and stop reasons equal plain decoding's."""
    from vllm import SamplingParams

    cases = []
    for r in reference:
        for j, t in enumerate(r["ids"]):
            if j > 0 and r["inside"][j] and r["ids"].index(t) == j:
                cases.append((r["prompt"], t, j))
                break
    assert len(cases) >= 4, "too few stop tokens inside accepted blocks"
    print(f"\nstop tokens inside accepted blocks at output index: {[j for _, _, j in cases]}")
    prompts = [p for p, _, _ in cases]
    params = [SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, stop_token_ids=[t])
              for _, t, _ in cases]
    got, expected = generate(dspark, prompts, params), generate(plain, prompts, params)
    for (_, t, j), g, e in zip(cases, got, expected):
        g, e = g.outputs[0], e.outputs[0]
        assert (tuple(g.token_ids), g.text, g.finish_reason, g.stop_reason) == \
               (tuple(e.token_ids), e.text, e.finish_reason, e.stop_reason)
        assert g.finish_reason == "stop" and g.stop_reason == t and len(g.token_ids) == j + 1


# -- preemption ---------------------------------------------------------------

def test_preemption_with_a_tiny_kv_cache(plain, pair, code):
    """24 requests x 64 tokens at once in a KV cache of 24 blocks of 32 slots (768 tokens):
    vLLM preempts requests (counted) and recomputes them later, with their draft
    context and look-ahead slots; the output still equals plain decoding without
    preemption."""
    import dspark_vllm
    from vllm import LLM

    prompts, _ = code
    params = greedy(max_tokens=64, ignore_eos=True)
    expected = token_ids(generate(plain, prompts, params))
    llm = LLM(model=pair["target"], **dspark_vllm.engine_kwargs(pair["dspark"]), **SETTINGS,
              num_gpu_blocks_override=24, block_size=32)
    try:
        got = token_ids(generate(llm, prompts, params))
        preemptions = counter(llm, "vllm:num_preemptions")
        accepted = counter(llm, "vllm:spec_decode_num_accepted_tokens")
    finally:
        close(llm)
    print(f"\npreemptions: {preemptions}, accepted draft tokens: {accepted}")
    assert preemptions > 0
    assert accepted > 0
    assert got == expected


# -- chunked prefill ------------------------------------------------------------

def _anchors_of_recent_rounds(worker):
    """Runs inside the worker: (request id, anchor, anchor position) of every recent round."""
    return [(req_id, int(r.anchors[j]), int(r.anchor_positions[j]))
            for r in worker.model_runner.drafter.recent_rounds for j, req_id in enumerate(r.req_ids)]


def test_a_prompt_prefilled_in_chunks_while_others_draft(plain, pair, code, monkeypatch):
    """A 400-token prompt through a 64-token step budget is prefilled over several steps
    while three short requests decode and draft beside it. A request whose step ends
    inside its prompt samples nothing (vLLM discards the token), so it has no anchor and
    does not draft until its prompt is done (`_dspark_anchors`): every round's anchor is
    the request's token at that position, never inside a prompt, and the output equals
    plain decoding."""
    import dspark_vllm
    from vllm import LLM

    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with a function
    short, stream = code
    prompts = [p[:20] for p in short[:3]] + [stream[:400]]
    params = greedy(max_tokens=16, ignore_eos=True)
    expected = generate(plain, prompts, params)
    llm = LLM(model=pair["target"], **dspark_vllm.engine_kwargs(pair["dspark"]), **SETTINGS,
              max_num_batched_tokens=64)
    try:
        got = generate(llm, prompts, params)
        [rounds] = llm.collective_rpc(_anchors_of_recent_rounds)
    finally:
        close(llm)
    assert token_ids(got) == token_ids(expected)
    # the engine's request ids are the outputs' ids with a suffix: "<id>-<random>"
    rounds = [(req_id.split("-")[0], anchor, position) for req_id, anchor, position in rounds]
    text = {out.request_id: list(out.prompt_token_ids) + list(out.outputs[0].token_ids) for out in got}
    prompt_len = {out.request_id: len(out.prompt_token_ids) for out in got}
    assert len(rounds) < 64 and set(text) >= {req_id for req_id, _, _ in rounds}
    last = {req_id: i for i, (req_id, _, _) in enumerate(rounds)}
    for i, (req_id, anchor, position) in enumerate(rounds):  # the worker keeps 64 rounds: these are all
        assert position >= prompt_len[req_id], (req_id, position)
        if position < len(text[req_id]):
            assert anchor == text[req_id][position], (req_id, position)
        else:  # only the round after the step that reached max_tokens (the engine trims that step's tokens)
            assert i == last[req_id], (req_id, position)
    long_id = got[3].request_id
    first_long = next(i for i, (req_id, _, _) in enumerate(rounds) if req_id == long_id)
    drafted_beside = {req_id for req_id, _, _ in rounds[:first_long]}
    assert drafted_beside == {out.request_id for out in got[:3]}  # the short ones drafted during its prefill


# -- prefix caching -------------------------------------------------------------

def test_prefix_caching_with_a_long_shared_prefix(plain, dspark, code):
    """Six prompts sharing a 300-token prefix, run twice. First every request computes
    its whole prompt (`skip_reading_prefix_cache`), which fills the cache; then each
    reads the prefix's target and draft K/V from the cached full blocks (two of 128
    tokens on the CPU). Both runs
    equal plain decoding, and the drafter, whose context K/V for the prefix now comes
    from blocks another request wrote, is accepted as often as with its own."""
    prompts, stream = code
    shared = stream[1000:1300]  # text no other test of this module reads
    batch = [shared + p[:24] for p in prompts[:6]]
    computed = greedy(max_tokens=48, ignore_eos=True, skip_reading_prefix_cache=True)
    cached = greedy(max_tokens=48, ignore_eos=True)
    expected = token_ids(generate(plain, batch, computed))
    assert token_ids(generate(plain, batch, cached)) == expected
    first = generate(dspark, batch, computed)
    second = generate(dspark, batch, cached)
    block_size = dspark.llm_engine.vllm_config.cache_config.block_size  # 128 on the CPU
    assert [o.num_cached_tokens for o in first] == [0] * len(batch)
    assert [o.num_cached_tokens for o in second] == [len(shared) // block_size * block_size] * len(batch)
    assert token_ids(first) == expected
    assert token_ids(second) == expected
    accepted = [sum(o.outputs[0].spec_decode_metrics.per_step_accepted) for o in first]
    accepted_cached = [sum(o.outputs[0].spec_decode_metrics.per_step_accepted) for o in second]
    print(f"accepted draft tokens per request: own prefix {accepted}, cached prefix {accepted_cached}")
    assert sum(accepted_cached) >= 0.9 * sum(accepted) > 0
