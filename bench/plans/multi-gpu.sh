#!/usr/bin/env bash
# The multi-GPU and Matryoshka runs on a two-GPU machine (two H200s), staged as in bench/reproduce_gpu.sh's header,
# started detached from a copy of the checkout (the plan outlasts one 10-minute call). Each argument is one item, run
# in order:
#   quality      at once: the Matryoshka run of smollm2-135m-plus (train.matryoshka_dims=[64,128,256]) on GPU 1
#                and its plain twin on GPU 0 (slmembed reproduce, then eval --dims 64 128 256), and bench/multi_node.py
#                on both GPUs (two launchers of one GPU each against one launcher, and a launcher killed);
#   nccl         the NCCL case of tests/test_loss.py;
#   multinode    bench/multi_node.py alone (two launchers of one GPU each against one launcher, and a launcher killed);
#   checks       at once, as neither is timed: graphs-test and multinode (two GPUs);
#   MODEL-bB     bench/multi_gpu.py for MODEL (smollm2-135m, gemma-3-270m) at B triplets per device, train.compile on
#                (packing is on by default on a GPU; neither recipe needs GradCache at these sizes on an H200), profiled;
#   MODEL-bB-graphs  the same with train.cuda_graphs (graphs holding the collectives); if that fails at
#                once, MODEL-bB follows, so the item still gives a measurement;
#   paper        the paper recipe (SmolLM2-135M, one epoch) on one GPU at batch 60 against two at 30 each;
#   sharded      bench/sharded.py: Gemma-3-270M, FSDP against DDP, both uncompiled;
#   encode-MODEL bench/encode_speed.py --compile --budgets for MODEL (encoding against the peer, nine-set eval
#                end to end in a fresh process), then bench/encode_profile.py;
#   kernels      kernels-test, then kernels-MODEL for both models;
#   kernels-test tests/test_kernels.py on the GPU (liger-kernel's fused kernels against transformers' modules);
#   kernels-MODEL bench/train_speed.py at 512: compiled with CUDA graphs, compiled, eager and eager with liger
#                (needs liger-kernel's wheel among the staged ones), the compiled steps profiled;
#   graphs       graphs-test, then graphs-MODEL for both models;
#   graphs-test  tests/test_cuda_graphs.py on the GPU (on two GPUs also two processes over NCCL);
#   graphs-MODEL bench/train_speed.py at 60: compiled with CUDA graphs against compiled packed and padded and the peer,
#                the first two profiled.
# On a one-GPU machine, quality runs the Matryoshka pair together on GPU 0 and skips multi-node (one
# launcher per GPU needs two); the MODEL-bB, paper, sharded and nccl items need two GPUs.
# Speed items run one at a time with the GPUs to themselves. After each item, results/bench, results/matryoshka and
# the logs are packed into $RESULTS/latest.tgz (atomically), so a plan cut short still returns what it finished.
#   mkdir -p /tmp/repo && cp -r src bench results pyproject.toml tests /tmp/repo && cd /tmp/repo &&
#   (RESULTS=/tmp/mg setsid nohup bash bench/plans/multi-gpu.sh quality smollm2-135m-b512 >/tmp/mg-plan.log 2>&1 &)
set -u
for item in "$@"; do  # every item checked before any run starts
  [[ $item =~ ^(quality|checks|nccl|multinode|paper|sharded|((kernels|graphs)(-test|-smollm2-135m|-gemma-3-270m)?)|(smollm2-135m|gemma-3-270m)-b[0-9]+(-graphs)?|encode-(smollm2-135m|gemma-3-270m))$ ]] ||
    { echo "bench/plans/multi-gpu.sh: unknown item '$item' (expected quality, checks, nccl, multinode, paper, sharded," \
        "kernels[-test|-MODEL], graphs[-test|-MODEL], MODEL-bB[-graphs] or encode-MODEL)"; exit 2; }
done
source bench/gpu_env.sh
RESULTS=${RESULTS:-/tmp/mg}
mkdir -p "$RESULTS/logs" results/bench results/matryoshka
rm -f "$RESULTS/done"  # a finished earlier plan's mark, which a waiting call would take for this one's
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
fast="--set train.compile=true"
gpus=$(nvidia-smi -L | wc -l)
step() {  # NAME SECONDS COMMAND...: run one, its output in logs/NAME.log; its exit status
  local name=$1 limit=$2 rc; shift 2
  echo "=== $(date +%T) $name: $*"
  timeout "$limit" "$@" >"$RESULTS/logs/$name.log" 2>&1
  rc=$?
  echo "=== $(date +%T) $name exit $rc"
  return $rc
}
matryoshka() {  # NAME GPU [--set ...]: train the best SmolLM2 recipe, then score its prefixes
  local name=$1 gpu=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu step "mrl-$name" 900 python3 -m slmembed reproduce --model smollm2-135m \
    --recipe smollm2-135m-plus "$@" $fast --device cuda --output "results/matryoshka/gpu-$name" &&
  CUDA_VISIBLE_DEVICES=$gpu step "mrl-$name-dims" 300 python3 -m slmembed eval --adapter "runs/reproduce/gpu-$name" \
    --dims 64 128 256 --device cuda --output "results/matryoshka/gpu-$name-dims.json"
}
multinode() {  # two launchers of one GPU each (a multi-node launch on one host) against one launcher, and a kill
  if [ "$gpus" -gt 1 ]; then
    step multi-node 900 python3 bench/multi_node.py --config smollm2-135m --device cuda --per-process-batch 30 \
      --steps 40 --save-every 20 --output results/bench/multi-node-cuda.json
  else
    echo "=== multi-node skipped: one GPU ($gpus found), a launcher per GPU needs two"
  fi
}
multi_gpu() {  # NAME MODEL BATCH STEPS [--set ...]: bench/multi_gpu.py, one GPU against two, compiled and profiled
  step "$1" 480 python3 bench/multi_gpu.py --config "$2" --per-device-batch "$3" --steps "$4" --warmup 20 \
    --profile 10:10 $fast "${@:5}" --output "results/bench/multi-gpu-$1.json"
}
pack() {
  tar czf "$RESULTS/packing.tgz" -C "$RESULTS" logs -C "$PWD" results/bench results/matryoshka &&
    mv "$RESULTS/packing.tgz" "$RESULTS/latest.tgz"
}
items=()  # kernels and graphs stand for their test and both models
for item in "$@"; do
  case $item in kernels|graphs) items+=("$item-test" "$item-gemma-3-270m" "$item-smollm2-135m");; *) items+=("$item");; esac
done
for item in "${items[@]}"; do
  case $item in
    quality)
      matryoshka plain 0 &
      matryoshka matryoshka $((gpus > 1)) --set "train.matryoshka_dims=[64,128,256]" &
      multinode &
      wait;;
    multinode)
      multinode;;
    checks)
      step graphs-test 420 python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda_graphs.py &
      multinode &
      wait;;
    nccl)
      CUDA_VISIBLE_DEVICES=0,1 step nccl 300 python3 -m pytest -q -p no:cacheprovider tests/test_loss.py -k nccl;;
    kernels-test)
      step kernels-test 300 python3 -m pytest -q -rs -p no:cacheprovider tests/test_kernels.py;;
    kernels-*)
      model=${item#kernels-}
      step "liger-$model" 480 python3 bench/train_speed.py --model "$model" --batches 512 --warmup 6 --steps 12 \
        --variants compile_graphs compile eager liger --peer-losses --profile-variants compile_graphs compile \
        --profile "results/bench/profile-$model-b512-{variant}.txt" --output "results/bench/train-$model-b512-liger.json";;
    graphs-test)
      step graphs-test 420 python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda_graphs.py;;
    graphs-*)
      model=${item#graphs-}
      step "graphs-$model" 600 python3 bench/train_speed.py --model "$model" --batches 60 --warmup 20 --steps 60 \
        --variants compile_graphs compile compile_padded --profile-variants compile_graphs compile \
        --profile "results/bench/profile-$model-b60-{variant}.txt" --output "results/bench/train-$model-b60-graphs.json";;
    encode-*)
      step "$item" 480 python3 bench/encode_speed.py --model "${item#encode-}" --compile --budgets 16384 65536 131072 \
        --output "results/bench/$item-h200.json"
      step "$item-profile" 300 python3 bench/encode_profile.py --model "${item#encode-}" \
        --output "results/bench/encode-profile-${item#encode-}-h200.txt";;
    *-b*)
      model=${item%-b*} batch=${item##*-b} steps=200 extra=""
      if [[ $batch == *-graphs ]]; then batch=${batch%-graphs} extra="--set train.cuda_graphs=true"; fi
      [ "$batch" -ge 512 ] && steps=60
      multi_gpu "$item" "$model" "$batch" $steps $extra
      rc=$?  # graphs that fail at once (not a timeout): the same run without them, so the item still measures
      if [ -n "$extra" ] && [ $rc -ne 0 ] && [ $rc -ne 124 ]; then multi_gpu "${item%-graphs}" "$model" "$batch" $steps; fi;;
    paper)
      step paper 900 python3 bench/multi_gpu.py --config smollm2-135m --per-device-batch 30 --gpus 2 --steps 670 \
        --warmup 10 $fast --output results/bench/multi-gpu-smollm2-135m-paper-b60.json;;
    sharded)
      step sharded 480 python3 bench/sharded.py --config gemma-3-270m --per-device-batch 60 --steps 100 --warmup 10 \
        --output results/bench/sharded-gemma-3-270m.json;;
  esac
  pack
done
touch "$RESULTS/done"
echo "=== $(date +%T) done: $RESULTS/latest.tgz"
