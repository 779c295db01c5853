#!/usr/bin/env bash
# Issue 15's runs on the two-GPU machine (nvidia-h200-x2), staged as in bench/reproduce_gpu.sh's header, in two
# phases started detached from a copy of the checkout (a phase outlasts one device call):
#   speed:  one at a time, the GPUs to themselves: bench/multi_gpu.py for SmolLM2-135M and Gemma-3-270M at 60 and
#           512 triplets per device with train.compile on (packing is on by default on a GPU; neither recipe needs
#           GradCache at these sizes on an H200), the 60-per-device runs profiled; then bench/sharded.py (Gemma-3-270M,
#           FSDP against DDP, both uncompiled).
#   checks: at once: the NCCL case of tests/test_loss.py, the paper recipe (SmolLM2-135M, one epoch) on one GPU at
#           batch 60 against two at 30 each, and bench/multi_node.py on the GPUs; with MATRYOSHKA=1 also issue 16's
#           Matryoshka run of smollm2-135m-plus and its plain twin (slmembed reproduce, then eval --dims).
# Each phase writes results/bench/*.json (and profile tables) and its logs, packed as $RESULTS/PHASE.tgz.
#   mkdir -p /tmp/repo && cp -r src bench results pyproject.toml tests /tmp/repo && cd /tmp/repo &&
#   (RESULTS=/tmp/mg setsid nohup bash bench/plans/multi-gpu.sh speed >/tmp/mg-speed.log 2>&1 &)
set -u
phase=$1
source bench/gpu_env.sh
RESULTS=${RESULTS:-/tmp/mg}
mkdir -p "$RESULTS/logs" results/bench
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
fast="--set train.compile=true"
step() {  # NAME SECONDS COMMAND...: run one, its output in logs/NAME.log
  local name=$1 limit=$2; shift 2
  echo "=== $(date +%T) $name: $*"
  timeout "$limit" "$@" >"$RESULTS/logs/$name.log" 2>&1
  echo "=== $(date +%T) $name exit $?"
}
if [ "$phase" = speed ]; then
  for model in smollm2-135m gemma-3-270m; do
    step "$model-b60" 420 python3 bench/multi_gpu.py --config "$model" --per-device-batch 60 --steps 200 \
      --warmup 20 --profile 10:10 $fast --output "results/bench/multi-gpu-$model-b60.json"
  done
  for model in smollm2-135m gemma-3-270m; do
    step "$model-b512" 420 python3 bench/multi_gpu.py --config "$model" --per-device-batch 512 --steps 60 \
      --warmup 20 --profile 10:10 $fast --output "results/bench/multi-gpu-$model-b512.json"
  done
  step sharded 420 python3 bench/sharded.py --config gemma-3-270m --per-device-batch 60 --steps 100 --warmup 10 \
    --output results/bench/sharded-gemma-3-270m.json
else
  CUDA_VISIBLE_DEVICES=0,1 step nccl 300 python3 -m pytest -q -p no:cacheprovider tests/test_loss.py -k nccl &
  step paper 900 python3 bench/multi_gpu.py --config smollm2-135m --per-device-batch 30 --gpus 2 --steps 670 \
    --warmup 10 $fast --output results/bench/multi-gpu-smollm2-135m-paper-b60.json &
  step multi-node 900 python3 bench/multi_node.py --config smollm2-135m --device cuda --per-process-batch 30 \
    --steps 40 --save-every 20 --output results/bench/multi-node-cuda.json &
  if [ "${MATRYOSHKA:-0}" = 1 ]; then
    for name in plain matryoshka; do
      sets=""; [ $name = matryoshka ] && sets="--set train.matryoshka_dims=[64,128,256]"
      ( CUDA_VISIBLE_DEVICES=1 step "mrl-$name" 900 python3 -m slmembed reproduce --model smollm2-135m \
          --recipe smollm2-135m-plus $sets \
          --set train.compile=true --device cuda --output "results/matryoshka/gpu-$name" &&
        step "mrl-$name-dims" 300 python3 -m slmembed eval --adapter "runs/reproduce/gpu-$name" --dims 64 128 256 \
          --device cuda --output "results/matryoshka/gpu-$name-dims.json" ) &
    done
  fi
  wait
fi
tar czf "$RESULTS/$phase.tgz" -C "$RESULTS" logs -C "$PWD" results/bench $(ls -d results/matryoshka 2>/dev/null)
echo "=== $(date +%T) done: $RESULTS/$phase.tgz"
