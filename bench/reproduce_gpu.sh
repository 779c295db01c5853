#!/usr/bin/env bash
# Run `slmembed reproduce` experiments on the GPU machine (see ../shared/gpu/README.md for staging), all at once:
# a small model leaves the H100 mostly idle, so concurrent runs finish sooner than one after another (their
# train.minutes then count shared time). Each writes results/reproduce/NAME/; all of results/reproduce and the
# training logs come back as $OUT/reproduce.tgz, and each run's output as $OUT/NAME.log.
#   bash bench/reproduce_gpu.sh NAME "ARGS" [NAME "ARGS" ...]
# e.g. bash bench/reproduce_gpu.sh gemma-3-270m "--model gemma-3-270m --curve 5"
source bench/gpu_env.sh
names=()
while [ $# -ge 2 ]; do
  name=$1; args=$2; shift 2; names+=("$name")
  echo "=== $name: slmembed reproduce $args --output results/reproduce/$name"
  python3 -m slmembed reproduce $args --output "results/reproduce/$name" --device cuda >"$OUT/$name.log" 2>&1 &
done
wait
for name in "${names[@]}"; do
  echo "=== $name"; grep -v -E "Loading weights|^\s*$|encode:|train:" "$OUT/$name.log" | tail -n 16
done
tar czf "$OUT/reproduce.tgz" results/reproduce runs/reproduce/*/train_log.jsonl
