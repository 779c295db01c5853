#!/usr/bin/env bash
# Create ./.venv and install slmembed with the offline models, at the exact versions locked in requirements/.
#   bash scripts/install.sh        # train, eval, demo, reproduce, report          (requirements/base.txt)
#   bash scripts/install.sh all    # + export (ONNX too), serve, embed to Parquet, TensorBoard (requirements/all.txt)
#   bash scripts/install.sh test   # + pytest, hypothesis, the openai client        (requirements/test.txt)
# Every file is checked against the sha256 in the lock (pip --require-hashes). torch is the CPU build, 2.13.0: an
# unpinned torch would pull a multi-GB CUDA build. scripts/lock.sh refreshes the locks.
set -euo pipefail
cd "$(dirname "$0")/.."
set_name=base
case "${1:-}" in
    "") ;;
    all | test) set_name=$1 ;;
    *) echo "install.sh: unknown set '$1': expected nothing, 'all' or 'test'" >&2; exit 2 ;;
esac
venv=${SLMEMBED_VENV:-.venv}
locks=${SLMEMBED_LOCKS:-requirements}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
# Exactly the locked files (--no-deps: the lock already lists every dependency; nothing is resolved here).
"${pip[@]}" --require-hashes --no-deps -r "$locks/$set_name.txt" -r "$locks/no-deps.txt"
# slmembed itself, editable, built with the locked setuptools rather than whatever a build environment would fetch.
"${pip[@]}" --no-deps --no-build-isolation -e .
