#!/usr/bin/env bash
# Wait up to SECONDS (default 540) for bench/gpu_session.sh, print where it stands (its log, the queue's, each run's
# last score or step, each speed step's last lines), and copy the packs that are ready into $OUT.
#   bash bench/gpu_wait.sh 540
limit=${1:-540}; waited=0
while [ ! -f /tmp/session/done ] && [ "$waited" -lt "$limit" ]; do sleep 10; waited=$((waited + 10)); done
date -u +%T
cat /tmp/session.log 2>/dev/null | grep -v "^\s*$" | tail -25
grep -v "^\s*$" /tmp/rq/driver.log 2>/dev/null | tail -12
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader 2>/dev/null
for log in /tmp/rq/*/logs/*.log; do
  [ -f "$log" ] || continue
  echo "--- $(basename "$log" .log)"; tail -c 4000 "$log" | tr '\r' '\n' | grep -a "reproduce\]\|rror\|step " | tail -3
done
for log in /tmp/session/speed/*.log; do [ -f "$log" ] && { echo "--- $log"; tail -4 "$log" | cut -c1-300; }; done
for pack in quality speed; do [ -f /tmp/session/$pack.tgz ] && cp /tmp/session/$pack.tgz "${OUT:?}/"; done
[ -f /tmp/session/done ] && echo "session done"
true
