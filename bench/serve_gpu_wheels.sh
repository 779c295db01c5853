#!/usr/bin/env bash
# Wheels of infinity-emb 0.0.78 (the peer server of bench/serve_gpu.py) for a machine without network, whose own torch
# it reuses: infinity pins numpy<2 and sentence-transformers<4 (hence transformers<5), so it runs from a separate
# `pip install --target` site dir on PYTHONPATH, ahead of the machine's site-packages.
#
#   bench/serve_gpu_wheels.sh [DEST [SPEC ...]]   # default DEST: wheels-infinity; PYVER=3.12 (the GPU machine's Python)
#
# SPEC (default infinity's) may name other requirements: `slmembed serve`'s own on that machine, at the lock's versions,
#   bench/serve_gpu_wheels.sh wheels-serve fastapi==0.165.0 uvicorn==0.54.0 orjson==3.13.0 uvloop==0.23.0
# (pip's resolution, not a hand-made list: fastapi 0.165 imports opentelemetry-api, which such a list missed).
#
# pip resolves the whole set from PyPI's metadata only (--dry-run --report), then downloads it without torch, triton,
# the nvidia-* CUDA wheels and what only torch needs (sympy, mpmath, networkx, setuptools), in DEST/part1, part2, ...
# of at most PART_MB each (what one upload carries). On the target, with the machine's python:
#
#   python -m pip install --no-index --no-deps --target INFSITE DEST/part*/*.whl
#   PYTHONPATH=INFSITE python -m infinity_emb.cli v2 --model-id FOLDER ...
set -euo pipefail
DEST=${1:-wheels-infinity}
shift || true
SPEC=("$@")
[ ${#SPEC[@]} -gt 0 ] || SPEC=("infinity-emb[server,torch]==0.0.78")
PYVER=${PYVER:-3.12}
PART_MB=${PART_MB:-55}
PIP=${PIP:-python3 -m pip}
TAGS=(--python-version "$PYVER" --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --only-binary=:all:)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$PIP install --dry-run --quiet --ignore-installed --target "$work/t" --report "$work/report.json" "${TAGS[@]}" "${SPEC[@]}"
python3 - "$work/report.json" >"$work/reqs.txt" <<'EOF'
import json, re, sys
skip = re.compile(r"^(torch|triton|nvidia-.*|sympy|mpmath|networkx|setuptools)$", re.I)
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    if not skip.match(meta["name"]):
        print(f"{meta['name']}=={meta['version']}")
EOF
mkdir -p "$DEST"
$PIP download --quiet --no-deps -d "$DEST" "${TAGS[@]}" -r "$work/reqs.txt"
cp "$work/reqs.txt" "$DEST/requirements.txt"
# Parts of at most PART_MB, largest wheels first (first fit).
python3 - "$DEST" "$PART_MB" <<'EOF'
import sys
from pathlib import Path
dest, limit = Path(sys.argv[1]), int(sys.argv[2]) * 2**20
parts: list[list[Path]] = []
for wheel in sorted(dest.glob("*.whl"), key=lambda p: -p.stat().st_size):
    size = wheel.stat().st_size
    part = next((p for p in parts if sum(w.stat().st_size for w in p) + size <= limit), None)
    if part is None:
        parts.append(part := [])
    part.append(wheel)
for k, part in enumerate(parts, 1):
    folder = dest / f"part{k}"
    folder.mkdir(exist_ok=True)
    for wheel in part:
        wheel.rename(folder / wheel.name)
    print(f"{folder}: {len(part)} wheels, {sum(w.stat().st_size for w in folder.iterdir()) / 2**20:.1f} MB")
EOF
echo "total: $(du -sm "$DEST" | cut -f1) MB in $(find "$DEST" -name '*.whl' | wc -l) wheels ($DEST)"
