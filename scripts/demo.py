"""Generate with DSpark on the small offline default models, next to plain decoding.

    python scripts/demo.py [--models DIR]

Builds the tiny fixture models into DIR (default ./fixtures) if they are not
there, then runs the same prompts through vLLM with and without DSpark and
prints the texts, whether they are identical, and the acceptance counters.
"""

import argparse
import os
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n", "class Stack:\n    def __init__(self):\n"]

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="fixtures")
    args = ap.parse_args()
    from vllm import LLM, SamplingParams

    import dspark_vllm
    from dspark_vllm.fixtures import make_fixtures

    models = Path(args.models)
    if not (models / "dspark" / "config.json").exists():
        make_fixtures(models)
    target, draft = str(models / "target"), str(models / "dspark")
    params = SamplingParams(temperature=0.0, max_tokens=48)
    common = dict(max_model_len=1024, enforce_eager=True, disable_log_stats=False)
    plain = [o.outputs[0].text for o in LLM(model=target, **common).generate(PROMPTS, params)]
    llm = LLM(model=target, **dspark_vllm.engine_kwargs(draft), **common)
    spec = [o.outputs[0].text for o in llm.generate(PROMPTS, params)]
    for prompt, text in zip(PROMPTS, spec):
        print(f"--- {prompt!r}\n{text!r}")
    print("identical to plain decoding:", spec == plain)
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            print(m.name, getattr(m, "values", None) or getattr(m, "value", None))
