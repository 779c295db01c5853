#!/usr/bin/env bash
# Refresh the install locks in requirements/ (see README, "Reproducible installs"), then prove them: a fresh virtual
# environment is installed from the new locks exactly as scripts/install.sh does and the whole test suite runs in it.
# Only if it passes do the new locks replace the old ones; otherwise the old ones stay and the failing run is kept
# in .lock-check/ to look at.
#
#   bash scripts/lock.sh              # newest versions the ranges in pyproject.toml allow
#   bash scripts/lock.sh --keep       # keep every locked version; only what pyproject.toml newly asks for is added
#   bash scripts/lock.sh --no-check   # write the locks without the test run (don't commit these)
#
# The resolver is uv's `pip compile` (uv pinned below, installed into a throwaway venv): it resolves the extras of
# pyproject.toml into requirements files with the sha256 of every allowed file. pip installs them (install.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
PY=3.11
PLATFORM=x86_64-manylinux_2_28
# The CPU build of torch: a local wheel folder (this workplace's /opt/wheels) or PyTorch's CPU index elsewhere.
TORCH_LINKS=${SLMEMBED_TORCH_LINKS:-/opt/wheels}

check=1 upgrade=--upgrade
for arg in "$@"; do
    case "$arg" in
        --no-check) check=0 ;;
        --keep) upgrade= ;;
        *) echo "lock.sh: unknown option '$arg': expected --keep or --no-check" >&2; exit 2 ;;
    esac
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/uv" && "$work/uv/bin/python" -m pip install -q "uv==$UV_VERSION"
uv=("$work/uv/bin/uv" pip compile --quiet --python-version "$PY" --python-platform "$PLATFORM" --generate-hashes
    --no-header $upgrade --find-links "$TORCH_LINKS")
new="$work/requirements"
mkdir -p "$new"
# Without --upgrade, uv prefers the versions already in the output file: start from the current locks.
[ -n "$upgrade" ] || cp requirements/*.txt "$new"/
# Inputs: pyproject.toml's extras plus requirements/tools.in (pip, setuptools, CPU torch), as install.sh installs them.
"${uv[@]}" pyproject.toml requirements/tools.in --extra offline-models --extra test -o "$new/test.txt"
# The smaller sets take the test set's versions, so every lock agrees on every package they share.
"${uv[@]}" pyproject.toml requirements/tools.in --extra offline-models --extra st --extra serve --extra parquet \
    --extra tensorboard --extra onnx -c "$new/test.txt" -o "$new/all.txt"
"${uv[@]}" pyproject.toml requirements/tools.in --extra offline-models -c "$new/test.txt" -o "$new/base.txt"
"${uv[@]}" --no-deps requirements/no-deps.in -o "$new/no-deps.txt"
for f in "$new"/*.txt; do
    { echo "# Locked by scripts/lock.sh (uv $UV_VERSION, Python $PY, $PLATFORM) on $(date -u +%F). Do not edit."
      grep -v -e '--find-links' -e "$work/requirements/test.txt" "$f"; } >"$f.tmp" && mv "$f.tmp" "$f"
done

if [ "$check" = 1 ]; then
    rm -rf .lock-check && mkdir .lock-check && cp -r "$new" .lock-check/requirements
    SLMEMBED_VENV=.lock-check/venv SLMEMBED_LOCKS=.lock-check/requirements bash scripts/install.sh test
    .lock-check/venv/bin/python -m pytest -q -n auto -p no:cacheprovider
    rm -rf .lock-check
fi
mkdir -p requirements
for f in "$new"/*.txt; do cp "$f" "requirements/.$(basename "$f").tmp" && mv "requirements/.$(basename "$f").tmp" "requirements/$(basename "$f")"; done
git --no-pager diff --stat -- requirements/ || true
