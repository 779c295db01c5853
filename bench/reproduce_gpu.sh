#!/usr/bin/env bash
# Run `slmembed reproduce` experiments on the GPU machine (see ../shared/gpu/README.md for staging), all at once:
# a small model leaves an H100/H200 mostly idle, so concurrent runs finish sooner than one after another (their
# train.minutes then count shared time). Each writes results/reproduce/NAME/; all of results/reproduce and the
# runs' logs, summaries and dev scores come back as $OUT/reproduce.tgz, with each run's output in it as NAME.log.
#   bash bench/reproduce_gpu.sh NAME "ARGS" [NAME "ARGS" ...]
#   bash bench/reproduce_gpu.sh PLAN          # a file of lines "NAME GPU ARGS..." (GPU: the CUDA device index)
# e.g. bash bench/reproduce_gpu.sh gemma-3-270m "--model gemma-3-270m --curve 5"
# RUN_TIMEOUT (seconds, default 560) stops a run that would outlast the device call, so the others still come back.
# How many at once (H200, 2026-11-30, 3 epochs at batch 512 with GradCache and compile): seven SmolLM2-135M runs on
# one GPU ran at about 195 triplets/s each (1,360 together) and none finished within a call; two a GPU finished in
# 4 minutes (SmolLM2-135M) and 6-7 minutes (Gemma-3-270M).
# Runs that outlast one device call: start this script detached in one call, e.g.
#   mkdir -p /tmp/repo /tmp/rq && cp -r src bench results pyproject.toml /tmp/repo && cd /tmp/repo &&
#   (OUT=/tmp/rq RUN_TIMEOUT=1200 setsid nohup bash bench/reproduce_gpu.sh PLAN >/tmp/rq/main.log 2>&1 &)
# then wait for /tmp/rq/reproduce.tgz in the next call (before the machine's 30 s idle release) and copy it to $OUT.
# The release counts from the end of a call: have every call's command ready beforehand (a script in the checkout),
# since composing a long one between calls took longer than 30 s twice on 2026-11-30 and lost the staged machine;
# and carry one path per staging call (the data and a stage folder together exceed the 64 MiB a call carries).
# Four runs a GPU that way (three SmolLM2-135M and one Gemma-3-270M) took 11 minutes (quality-3.txt).
source bench/gpu_env.sh
mkdir -p "$OUT/logs"
names=()
start() {  # NAME GPU ARGS
  local name=$1 gpu=$2; shift 2
  names+=("$name")
  echo "=== $name (GPU $gpu): slmembed reproduce $* --output results/reproduce/$name"
  CUDA_VISIBLE_DEVICES=$gpu timeout "${RUN_TIMEOUT:-560}" python3 -m slmembed reproduce "$@" \
    --output "results/reproduce/$name" --device cuda >"$OUT/logs/$name.log" 2>&1 &
}
if [ $# -eq 1 ] && [ -f "$1" ]; then
  while read -r name gpu args; do
    [ -z "$name" ] || [ "${name:0:1}" = "#" ] && continue
    eval "start $name $gpu $args"
  done <"$1"
else
  while [ $# -ge 2 ]; do start "$1" 0 $2; shift 2; done
fi
wait
for name in "${names[@]}"; do
  echo "=== $name"; grep -v -E "Loading weights|^\s*$|encode:|train:|LOAD REPORT|^Key|^---|UNEXPECTED|^Notes" \
    "$OUT/logs/$name.log" | tail -n 6
done
tar czf "$OUT/reproduce.tgz" -C "$OUT" logs -C "$PWD" results/reproduce \
  $(python3 -m slmembed.run "${names[@]/#/runs/reproduce/}")  # each run's records (run.RunDir.records)
