import os
import random
import textwrap

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def fixture_paths(tmp_path_factory):
    """A tiny Qwen3 target and a DeepSpec-format DSpark drafter (block_size 7).

    DSPARK_TEST_FIXTURES=DIR reuses `python scripts/make_fixtures.py --out DIR`
    (the same models, built once for several test sessions)."""
    from dspark_vllm.fixtures import make_fixtures

    prebuilt = os.environ.get("DSPARK_TEST_FIXTURES")
    if prebuilt:
        return {"target": os.path.join(prebuilt, "target"), "dspark": os.path.join(prebuilt, "dspark")}
    return make_fixtures(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def prompts(fixture_paths):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fixture_paths["target"])
    words = open(textwrap.__file__).read().split()  # a fixed text, unlike this file
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 80))) for _ in range(24)]
    return [tok(t).input_ids[:300] for t in texts]  # room for 64 new tokens in max_model_len


@pytest.fixture(scope="session")
def baseline(fixture_paths):
    from vllm import LLM

    from engine_utils import COMMON

    return LLM(model=fixture_paths["target"], **COMMON)
