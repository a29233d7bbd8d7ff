"""Structured output (JSON schema, regex, choice) with DSpark in a real vLLM engine on the CPU.

Greedy output under a grammar equals plain decoding under the same grammar,
token for token. vLLM's scheduler cuts each request's drafts at the first
token its grammar rejects (`StructuredOutputManager.validate_tokens`, called
from `Scheduler.update_draft_token_ids`) and masks the target's logits with
the grammar; the plugin's drafter knows nothing of the grammar. The tests also
print how often the grammar cut a draft and at which block position, from the
plugin's own per-engine counters (run pytest with -s to see them).

The greedy tests run the embedded default pair (a trained code model and its
DSpark drafter), so that drafts are accepted at all; the constraints are
chosen so that the output is decided by the grammar and the target's argmax,
and mostly finishes well before max_tokens. One sampled test (random fixture
pair, temperature 2) checks that a grammar's cut of a *sampled* draft keeps
the output distribution exact.
"""

import json
import re
from collections import Counter

import numpy as np
import pytest

from engine_utils import COMMON, close, generate
from stats import ALPHA, pvalue

pytestmark = pytest.mark.slow

BLOCK = 7
MAX_TOKENS = 64

IDENTIFIER = r"[a-z_]{4,24}"
DEF_LINE = r"def [a-z_]{3,20}\(self(, [a-z_]{1,12}){0,3}\):"
CHOICES = ["return None", "raise ValueError", "pass"]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z_]{1,16}$"},
        "kind": {"enum": ["function", "class", "module"]},
        "lines": {"type": "integer", "minimum": 0, "maximum": 999},
    },
    "required": ["name", "kind", "lines"],
    "additionalProperties": False,
}


def matches_schema(text: str) -> bool:
    obj = json.loads(text)
    return (set(obj) == {"name", "kind", "lines"} and re.fullmatch("[a-z_]{1,16}", obj["name"]) is not None
            and obj["kind"] in ("function", "class", "module")
            and isinstance(obj["lines"], int) and 0 <= obj["lines"] <= 999)


# name -> (StructuredOutputsParams keyword arguments, check of a finished output's text)
CONSTRAINTS = {
    "regex-identifier": (dict(regex=IDENTIFIER), lambda t: re.fullmatch(IDENTIFIER, t) is not None),
    "regex-def-line": (dict(regex=DEF_LINE), lambda t: re.fullmatch(DEF_LINE, t) is not None),
    "choice": (dict(choice=CHOICES), lambda t: t in CHOICES),
    "json-schema": (dict(json=SCHEMA), matches_schema),
}


@pytest.fixture(scope="module")
def pair():
    from dspark_vllm import demo_paths

    return demo_paths()


@pytest.fixture(scope="module")
def code_prompts(pair):
    """Eight held-out code prompts of at most 120 tokens."""
    from transformers import AutoTokenizer

    from dspark_vllm.prompts import load_turns

    tok = AutoTokenizer.from_pretrained(pair["target"])
    return [tok(t).input_ids[:120] for t in load_turns(pair["prompts"], 8)]


@pytest.fixture(scope="module")
def plain(pair):
    from vllm import LLM

    llm = LLM(model=pair["target"], **COMMON)
    yield llm
    close(llm)


@pytest.fixture(scope="module")
def dspark(pair):
    """`fixed` verification without a cost profile: every step drafts a whole block."""
    import dspark_vllm
    from vllm import LLM

    llm = LLM(model=pair["target"], **dspark_vllm.engine_kwargs(pair["dspark"]), **COMMON)
    yield llm
    close(llm)


def counts(llm) -> dict[str, np.ndarray]:
    """The plugin's per-position counters of this engine (exact, from its driver worker)."""
    [stats] = llm.collective_rpc("dspark_stats")
    return {k: np.array(stats[k]) for k in ("drafted", "verified", "accepted")}


def draft_cuts(before: dict, after: dict, num_requests: int) -> dict[str, np.ndarray]:
    """Per block position: drafts proposed for verification, cut before verification,
    verified, accepted, during one batch of `num_requests` requests.

    With `fixed` verification every step that samples a token for a request drafts a
    whole block for it, and the next step verifies it; the round drafted in a request's
    last step is never verified (the request has finished). So, per position,
    proposed = drafted - num_requests, and what the scheduler did not send to the
    target is proposed - verified: under structured output, the grammar's cuts (for
    sampled requests DSparkScheduler keeps the first invalid draft for verification,
    where it is rejected: it counts as verified). Prompts here are far from
    max_model_len, so the scheduler trims nothing else.
    """
    delta = {k: after[k] - before[k] for k in after}
    proposed = delta["drafted"] - num_requests
    return dict(proposed=proposed, cut=proposed - delta["verified"], verified=delta["verified"],
                accepted=delta["accepted"])


def report(name: str, cuts: dict) -> str:
    proposed, cut = cuts["proposed"].sum(), cuts["cut"].sum()
    per_pos = " ".join(f"{c / p:.2f}" if p else "-" for c, p in zip(cuts["cut"], cuts["proposed"]))
    acc = cuts["accepted"].sum() / max(cuts["verified"].sum(), 1)
    return (f"{name}: grammar cut {int(cut)} of {int(proposed)} proposed draft tokens ({cut / proposed:.1%}); "
            f"cut share per block position 1..{BLOCK}: {per_pos}; "
            f"accepted {int(cuts['accepted'].sum())} of {int(cuts['verified'].sum())} verified ({acc:.1%})")


def test_draft_accounting_without_a_grammar(plain, dspark, code_prompts):
    """Control for the cut accounting: without structured output nothing cuts a draft
    (every proposed draft token is verified), and greedy output equals plain."""
    from vllm import SamplingParams

    prompts = code_prompts
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    before = counts(dspark)
    got = generate(dspark, prompts, params)
    cuts = draft_cuts(before, counts(dspark), len(prompts))
    print("\n" + report("no grammar", cuts))
    expected = generate(plain, prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert cuts["proposed"].sum() > 0 and cuts["cut"].sum() == 0
    assert cuts["accepted"].sum() > 0


@pytest.mark.parametrize("name", list(CONSTRAINTS))
def test_greedy_structured_output_equals_plain(plain, dspark, code_prompts, name, record_property):
    """Under each constraint DSpark's greedy output (text, token ids, finish reason)
    equals plain decoding's, and every output that finished is valid. The share of
    draft tokens the grammar cut is printed (and recorded as a junit property)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    prompts = code_prompts
    kwargs, valid = CONSTRAINTS[name]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                            structured_outputs=StructuredOutputsParams(**kwargs))
    expected = generate(plain, prompts, params)
    before = counts(dspark)
    got = generate(dspark, prompts, params)
    cuts = draft_cuts(before, counts(dspark), len(prompts))
    print("\n" + report(name, cuts))
    print(f"{name}: outputs {[o.outputs[0].text for o in got]}")
    record_property(f"{name}_grammar_cut_share", float(cuts["cut"].sum() / cuts["proposed"].sum()))

    for g, e in zip(got, expected):
        g, e = g.outputs[0], e.outputs[0]
        assert (g.text, tuple(g.token_ids), g.finish_reason) == (e.text, tuple(e.token_ids), e.finish_reason)
    finished = [o.outputs[0].text for o in got if o.outputs[0].finish_reason == "stop"]
    assert finished, "no output finished its grammar"
    assert all(valid(t) for t in finished), finished


# -- sampling: a grammar's cut of a sampled draft must act as a rejection -------

LETTERS = r"[a-z]{20,40}"


def test_sampled_structured_output_follows_the_masked_target(fixture_paths, prompts):
    """At temperature 2, under the regex [a-z]{20,40}, two sampled tokens follow the
    target's distribution restricted to letter-only tokens (exact conditionals from
    Hugging Face transformers; no token has 10 letters, so the grammar cannot end).

    The random fixture drafter puts mass both on letter tokens and elsewhere: vLLM's
    scheduler cuts a draft at its first invalid token, and if the cut position were
    sampled from p (vLLM's bonus) instead of rejecting the invalid draft and sampling
    the residual, the second token would be off (measured before DSparkScheduler kept
    the invalid draft: second-token p-value 1.5e-36 here). The second-token test
    compares counts with the sum of each sample's exact conditional given its first
    token (conservative: the spread of a mixture is at least that of its parts)."""
    import re

    import dspark_vllm
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    n, temperature, prompt = 8000, 2.0, list(prompts[3])
    tok = AutoTokenizer.from_pretrained(fixture_paths["target"])
    allowed = torch.tensor([re.fullmatch("[a-z]+", tok.decode([t])) is not None for t in range(len(tok))])
    assert 0 < allowed.sum() < len(tok) and max(len(tok.decode([t])) for t in allowed.nonzero()[:, 0]) < 10

    llm = LLM(model=fixture_paths["target"], **dspark_vllm.engine_kwargs(fixture_paths["dspark"]), **COMMON)
    try:
        params = SamplingParams(temperature=temperature, max_tokens=2,
                                structured_outputs=StructuredOutputsParams(regex=LETTERS))
        before = counts(llm)
        samples = [tuple(o.outputs[0].token_ids) for o in generate(llm, [prompt] * n, params)]
        cuts = draft_cuts(before, counts(llm), n)
    finally:
        close(llm)
    print("\n" + report("sampled [a-z]{20,40}", cuts))
    assert all(len(s) == 2 and allowed[s[0]] and allowed[s[1]] for s in samples)

    model = AutoModelForCausalLM.from_pretrained(fixture_paths["target"], dtype=torch.float32).eval()

    def cond(prefix) -> np.ndarray:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + list(prefix)])).logits[0, -1, : len(tok)].double()
        return (logits / temperature).masked_fill(~allowed, -float("inf")).softmax(-1).numpy()

    assert pvalue(Counter(s[0] for s in samples), cond(())) > ALPHA
    given = {t: cond((t,)) for t in set(s[0] for s in samples)}
    assert pvalue(Counter(s[1] for s in samples), sum(given[s[0]] for s in samples) / n) > ALPHA
    # The mechanism: almost every request had its first draft verified (valid or not).
    assert cuts["verified"][0] > 0.9 * n
