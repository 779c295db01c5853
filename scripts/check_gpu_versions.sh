#!/usr/bin/env bash
# Run the test suite against the oldest versions pyproject.toml admits, next to the newest ones of the locks: the GPU
# machine's peft 0.21, sentence-transformers 6.0.1, accelerate 1.15 (shared/gpu/README.md) and transformers 5.18
# (the machine's 5.17 mis-converts Gemma's GGUF tokenizer; torch stays the CPU build 2.13: PyPI has no CPU build of
# 2.11). Uses ./.venv-gpu-versions.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-gpu-versions
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" --require-hashes --no-deps -r requirements/test.txt -r requirements/no-deps.txt
"${pip[@]}" transformers==5.18.0 peft==0.21.0 sentence-transformers==6.0.1 accelerate==1.15.0 torch==2.13.0
"${pip[@]}" --no-deps --no-build-isolation -e .
"$venv/bin/python" -m pip list 2>/dev/null | grep -iE '^(torch|transformers|peft|sentence-transformers|accelerate) '
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
