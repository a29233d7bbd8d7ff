"""DSpark speculative decoding for vLLM 0.32 (plugin).

    from vllm import LLM
    import dspark_vllm
    llm = LLM(model=TARGET, **dspark_vllm.engine_kwargs(DRAFT))
"""

from .config import DSparkOptions, demo_paths, engine_kwargs, serve_flags
from .model.config import DSparkConfig, DSparkConfigError

__all__ = ["DSparkConfig", "DSparkConfigError", "DSparkOptions", "DSparkProposer",
           "demo_paths", "engine_kwargs", "serve_flags"]


def __getattr__(name):
    # vLLM imports the proposer by path ("dspark_vllm.DSparkProposer") inside
    # its workers; importing vLLM here eagerly would slow down every import.
    if name == "DSparkProposer":
        from .vllm_integration import DSparkProposer

        return DSparkProposer
    raise AttributeError(name)
