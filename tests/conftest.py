import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def fixture_paths(tmp_path_factory):
    """A tiny Qwen3 target and a DeepSpec-format DSpark drafter (block_size 7)."""
    from dspark_vllm.fixtures import make_fixtures

    return make_fixtures(tmp_path_factory.mktemp("models"))
