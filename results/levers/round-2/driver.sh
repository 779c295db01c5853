# detached on the device, cwd /tmp/repo: a priority queue of reproduce runs (plans/plan7.txt: NAME DEPS ARGS),
# at most $N at once; a run starts when its DEPS finished well, and only while the deadline leaves it time.
# /tmp/rq/deadline (epoch seconds) may be rewritten by a later call; at the deadline every run is stopped.
cd /tmp/repo
echo "driver start $(date -u +%FT%TZ)"
source bench/gpu_env.sh
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
python3 -c "import transformers, tokenizers, torch, huggingface_hub as h; print('transformers', transformers.__version__, 'tokenizers', tokenizers.__version__, 'torch', torch.__version__, 'hub', h.__version__)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
N=${N:-6}
[ -f /tmp/rq/deadline ] || echo $(( $(date +%s) + ${BUDGET:-1320} )) > /tmp/rq/deadline
t0=$(date +%s)
for m in smollm2-135m gemma-3-270m all-minilm-l6-v2; do python3 -c "from slmembed import models; print(models.resolve('$m'))" 2>&1 | tail -1 & done; wait
echo "resolved in $(( $(date +%s) - t0 )) s  $(date -u +%FT%TZ)"
mkdir -p /tmp/rq/rc
one() {  # NAME ARGS...: one reproduce run through bench/reproduce_gpu.sh, its rc into /tmp/rq/rc/NAME
  local name=$1; shift; mkdir -p /tmp/rq/$name
  if [ "$1" = eval ]; then  # an eval line: e.g. the teachers' ensemble, scored as soon as they exist
    mkdir -p results/levers; python3 -m slmembed "$@" --output results/levers/$name.json --device cuda >/tmp/rq/$name/eval.log 2>&1
    local rc=$?; echo $rc > /tmp/rq/rc/$name; echo "finished $name rc=$rc $(date -u +%FT%TZ)"; return
  fi
  printf '%s 0 %s\n' "$name" "$*" > plans/$name.txt
  OUT=/tmp/rq/$name RUN_TIMEOUT=$(( $(cat /tmp/rq/deadline) - $(date +%s) )) bash bench/reproduce_gpu.sh plans/$name.txt >/tmp/rq/$name/runner.log 2>&1
  local rc=$?; [ -f results/reproduce/$name/$name.json ] || rc=1
  echo $rc > /tmp/rq/rc/$name; echo "finished $name rc=$rc $(date -u +%FT%TZ)"
}
mapfile -t lines < <(grep -v '^#' plans/plan7.txt | grep .)
declare -A started
need() {  # NAME: minutes a run needs from its start (SmolLM2 runs and 4-epoch Gemma runs are the long ones)
  case "$1" in *ensemble*) echo 2;; *adapt*|*mntp*) echo 13;; smollm2*|*smollm2-recipe*) echo 11;; *) echo 7;; esac; }
while :; do
  left=$(( $(cat /tmp/rq/deadline) - $(date +%s) ))
  pick=""
  cap=$N  # fewer at once until the teachers are done, so that they finish early and their students have time
  for d in ${EARLY_UNTIL:-smollm2-135m-plus-seed11 gemma-3-270m-plus-seed11}; do [ -f /tmp/rq/rc/$d ] || cap=${N_EARLY:-4}; done
  if [ $(jobs -rp | wc -l) -lt $cap ]; then
    for l in "${lines[@]}"; do
      read -r name deps args <<<"$l"; [ -n "${started[$name]}" ] && continue
      ok=1; if [ "$deps" != "-" ]; then for d in ${deps//,/ }; do [ "$(cat /tmp/rq/rc/$d 2>/dev/null)" = 0 ] || ok=0; done; fi
      [ $ok = 1 ] || continue
      [ $left -gt $(( $(need $name) * 60 )) ] || { started[$name]=skipped; echo "skipped $name (${left}s left) $(date -u +%T)"; continue; }
      pick=$name; break
    done
  fi
  if [ -n "$pick" ]; then
    read -r name deps args <<<"$(printf '%s\n' "${lines[@]}" | grep "^$pick ")"
    started[$pick]=1; echo "start $pick $(date -u +%T) (${left}s left)"; eval "one $pick $args" &
    sleep 5; continue
  fi
  # nothing to start: done when no job runs and every line is started, skipped, or waits on a failed dependency
  [ $(jobs -rp | wc -l) -eq 0 ] && break
  [ $left -le 0 ] && { echo "deadline: stopping runs $(date -u +%T)"; pkill -f "slmembed reproduce"; sleep 5; }
  sleep 10
done
wait
echo "driver end $(date -u +%FT%TZ)"
touch /tmp/rq/done
