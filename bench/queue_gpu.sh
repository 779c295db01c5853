#!/usr/bin/env bash
# A priority queue of `slmembed reproduce` runs on one GPU, detached, from the repository root (staged as in
# ../shared/gpu/README.md): PLAN is a file of lines "NAME DEPS ARGS" (DEPS: "-" or runs, comma-separated, that must
# have finished well first; ARGS: reproduce's, or "eval ..." for an `slmembed eval` into results/levers/NAME.json).
# At most N run at once (N_EARLY until the runs named in EARLY_UNTIL are done, e.g. teachers whose students wait); a
# run starts only while the deadline (/tmp/rq/deadline, epoch seconds, which a later call may rewrite) leaves it the
# minutes need() gives it; at the deadline every run is stopped. Each run goes through bench/reproduce_gpu.sh
# (results/reproduce/NAME/); /tmp/rq/rc/NAME holds its exit status, /tmp/rq/done marks the end.
#   PLAN=bench/plans/quality-8.txt N=6 setsid nohup bash bench/queue_gpu.sh >/tmp/rq/driver.log 2>&1 &
PLAN=${PLAN:?PLAN: the plan file}
mkdir -p /tmp/rq
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
  printf '%s 0 %s\n' "$name" "$*" > /tmp/rq/$name/plan.txt
  # no timeout of its own: the loop below stops the runs at the deadline, read afresh each time, so that a later call
  # that moves the deadline gives the running runs the time too
  OUT=/tmp/rq/$name RUN_TIMEOUT=infinity bash bench/reproduce_gpu.sh /tmp/rq/$name/plan.txt >/tmp/rq/$name/runner.log 2>&1
  local rc=$?; [ -f results/reproduce/$name/$name.json ] || rc=1
  echo $rc > /tmp/rq/rc/$name; echo "finished $name rc=$rc $(date -u +%FT%TZ)"
}
mapfile -t lines < <(grep -v '^#' "$PLAN" | grep .)
declare -A started
need() {  # NAME: minutes a run needs from its start (SmolLM2 runs and 4-epoch Gemma runs are the long ones)
  case "$1" in *ensemble*) echo 2;; gemma*-data-*) echo 4;; *-data-1-8) echo 3;; *-data-1-4) echo 4;; *-data-1-2) echo 6;; smollm2*llm2vec*) echo 13;; *adapt*|*mntp*|*llm2vec*) echo 9;; *soup*) echo 20;; smollm2*|*smollm2-recipe*) echo 11;; *) echo 7;; esac; }
while :; do
  left=$(( $(cat /tmp/rq/deadline) - $(date +%s) ))
  pick=""
  cap=$N  # fewer at once until the teachers are done, so that they finish early and their students have time
  for d in ${EARLY_UNTIL:-}; do [ -f /tmp/rq/rc/$d ] || cap=${N_EARLY:-4}; done
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
