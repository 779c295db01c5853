#!/usr/bin/env bash
# The speed measurements of one GPU, in priority order, each stopped in time for the next and for the results to come
# back: serving against infinity-emb (SmolLM2-135M; eager, CUDA graphs, compiled blocks in graphs), a lone text's time
# split into its steps (bench/serve_overhead.py), serving Gemma-3-270M, the multi-adapter server, the nine-set eval in
# fresh processes, batch 512 training with variable-length FlashAttention against FlexAttention in 128- and 64-token
# tiles.
# Run it detached from the repository root on the GPU machine (see ../shared/gpu/README.md for staging; infinity's
# wheels: bench/serve_gpu_wheels.sh, installed with `pip install --no-deps --target $INFSITE`):
#
#   DEADLINE=$(( $(date +%s) + 1200 )) INFSITE=/tmp/infsite setsid nohup bash bench/speed_gpu.sh >LOG 2>&1 &
#
# SKIP="NAME ..." leaves steps out (e.g. SKIP=eval-phases where that card's figures exist); ONLY="NAME ..." runs those
# steps alone (e.g. ONLY=train: the short runs and exports the serving steps use).
# Results: results/bench/{serve-gpu,eval-phases,importtime-eval,train,profile}-*-DEVICE.json/txt; each step's output in
# $LOGS/NAME.log; $LOGS/done when it ends. The served models come from short runs of the shipped recipes (a few steps:
# serving speed depends on the architecture and the embedding spec, not on the weights).
set -u
source bench/gpu_env.sh
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TOKENIZERS_PARALLELISM=false
LOGS=${LOGS:-/tmp/speed-gpu} INFSITE=${INFSITE:-/tmp/infsite} CELL_S=${CELL_S:-5} WORK=${WORK:-/tmp/speed-gpu-work}
DEADLINE=${DEADLINE:-$(( $(date +%s) + 1800 ))}
mkdir -p "$LOGS" "$WORK" results/bench
echo "start $(date -u +%FT%TZ)"
python3 -c "import transformers, tokenizers, torch; print('transformers', transformers.__version__, 'tokenizers', tokenizers.__version__, 'torch', torch.__version__)"
case "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" in *H200*) dev=h200;; *H100*) dev=h100;; *) dev=gpu;; esac
step() {  # NAME MAXSECONDS CMD: CMD under a timeout of min(MAXSECONDS, the time left), its output in $LOGS/NAME.log
  local name=$1 max=$2 left=$(( DEADLINE - $(date +%s) )); shift 2
  case " ${SKIP:-} " in *" $name "*) echo "skip $name (SKIP)"; return 1;; esac
  [ -n "${ONLY:-}" ] && case " $ONLY " in *" $name "*) ;; *) echo "skip $name (ONLY)"; return 1;; esac
  [ "$left" -lt 45 ] && { echo "skip $name (${left}s left)"; return 1; }
  [ "$max" -gt "$left" ] && max=$left
  echo "start $name $(date -u +%T) (limit ${max}s)"
  local t0; t0=$(date +%s)
  timeout -k 10 "$max" bash -c "$*" >"$LOGS/$name.log" 2>&1
  local rc=$?; echo "end $name rc=$rc $(( $(date +%s) - t0 ))s"; return $rc
}
for m in smollm2-135m gemma-3-270m; do python3 -c "from slmembed import models; print(models.resolve('$m'))" & done; wait
short="--set train.max_steps=3"
# (each background job waited for by its pid: a bare `wait` returns 0 whichever of them failed)
step train 240 "python3 -m slmembed train --recipe smollm2-135m $short --output $WORK/smollm2-a & a=\$!
  python3 -m slmembed train --recipe smollm2-135m $short --set train.seed=7 --output $WORK/smollm2-b & b=\$!
  python3 -m slmembed train --recipe gemma-3-270m $short --output $WORK/gemma & c=\$!
  wait \$a && wait \$b && wait \$c || exit 1
  python3 -m slmembed export --run $WORK/smollm2-a --output $WORK/smollm2-135m --format st & a=\$!
  python3 -m slmembed export --run $WORK/gemma --output $WORK/gemma-3-270m --format st & b=\$!
  wait \$a && wait \$b"
serve="python3 bench/serve_gpu.py --infinity-python python3 --infinity-site $INFSITE --dtype bfloat16 --seconds $CELL_S"
step serve-smollm2 420 "$serve --servers slmembed infinity slmembed-graphs slmembed-compile-graphs \
  --model $WORK/smollm2-135m --output results/bench/serve-gpu-smollm2-135m-$dev.json"
# the fastest server first; the eager forward of a lone text takes ~37 ms on an H100 host, hence its fewer requests
step serve-overhead 300 "for m in smollm2-135m gemma-3-270m; do
  python3 bench/serve_overhead.py --model $WORK/\$m --dtype bfloat16 --cuda-graphs --compile --requests 1000 \
  --output results/bench/serve-overhead-\$m-compile-graphs-$dev.json; done &&
  python3 bench/serve_overhead.py --model $WORK/smollm2-135m --dtype bfloat16 --cuda-graphs --requests 1000 \
  --output results/bench/serve-overhead-smollm2-135m-graphs-$dev.json &&
  python3 bench/serve_overhead.py --model $WORK/smollm2-135m --dtype bfloat16 --requests 300 \
  --output results/bench/serve-overhead-smollm2-135m-$dev.json"
step serve-gemma 480 "$serve --servers slmembed infinity slmembed-graphs slmembed-compile-graphs \
  --model $WORK/gemma-3-270m --output results/bench/serve-gpu-gemma-3-270m-$dev.json"
step serve-adapters 200 "python3 bench/serve_gpu.py --model $WORK/smollm2-135m --servers \
  --adapter-runs $WORK/smollm2-a $WORK/smollm2-b --dtype bfloat16 --seconds $CELL_S \
  --output results/bench/serve-gpu-adapters-smollm2-135m-$dev.json"
step eval-phases 240 "cd bench && python3 eval_phases.py --model gemma-3-270m --repeats 3 \
  --output ../results/bench/eval-phases-gemma-3-270m-$dev.json && cd .. &&
  python3 -X importtime -m slmembed eval --model gemma-3-270m --output $WORK/eval.json \
  2>results/bench/importtime-eval-$dev.txt &&
  echo staged .pyc files: \$(find /tmp/site -name '*.pyc' | wc -l), .py files: \$(find /tmp/site -name '*.py' | wc -l)"
step flex-gemma 420 "python3 bench/train_speed.py --model gemma-3-270m --batches 512 --warmup 6 --steps 12 \
  --variants compile_graphs --packed-attention varlen flex flex64 --peer-losses \
  --profile 'results/bench/profile-gemma-3-270m-b512-{variant}.txt' --profile-variants compile \
  --output results/bench/train-gemma-3-270m-b512-flex-tiles-$dev.json"
step flex-smollm2 360 "python3 bench/train_speed.py --model smollm2-135m --batches 512 --warmup 6 --steps 12 \
  --variants compile_graphs --packed-attention varlen flex flex64 --peer-losses \
  --profile 'results/bench/profile-smollm2-135m-b512-{variant}.txt' --profile-variants compile \
  --output results/bench/train-smollm2-135m-b512-flex-tiles-$dev.json"
echo "end $(date -u +%FT%TZ)"
touch "$LOGS/done"
