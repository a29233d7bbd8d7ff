"""vLLM general-plugin entry point (`vllm.general_plugins: dspark`)."""


def register() -> None:
    """Called by vLLM in every process; cheap and idempotent."""
    from . import vllm_integration

    vllm_integration.install()
