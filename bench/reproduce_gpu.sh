#!/usr/bin/env bash
# Run a list of `slmembed reproduce` experiments on the GPU machine (see ../shared/gpu/README.md for staging);
# each writes results/reproduce/NAME/, and all of results/reproduce comes back as $OUT/reproduce.tgz.
#   bash bench/reproduce_gpu.sh NAME "ARGS" [NAME "ARGS" ...]
# e.g. bash bench/reproduce_gpu.sh gemma-3-270m "--model gemma-3-270m --curve 5"
source bench/gpu_env.sh
while [ $# -ge 2 ]; do
  name=$1; args=$2; shift 2
  echo "=== $name: slmembed reproduce $args --output results/reproduce/$name"
  python3 -m slmembed reproduce $args --output "results/reproduce/$name" --device cuda 2>&1 \
    | grep -v -E "Loading weights|^\s*$|encode:|train:" | tail -n 25
  tar czf "$OUT/reproduce.tgz" results/reproduce runs/reproduce/*/train_log.jsonl
done
