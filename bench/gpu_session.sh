#!/usr/bin/env bash
# One GPU, one detached job: the quality queue (bench/queue_gpu.sh with PLAN) until its deadline, with the speed steps'
# short training runs and exports made beside it, then the speed steps (bench/speed_gpu.sh) with the card to
# themselves. Run from the repository root once the data and wheels are staged (../shared/gpu/README.md; the checkout
# travels with every upload, so stage in pieces of at most 50 MiB). It works on a copy of the checkout in /tmp/repo,
# so that a later upload of the checkout does not disturb the runs, and packs what each part wrote as soon as it ends:
# /tmp/session/quality.tgz (the queue's log and each run's reproduce.tgz) and /tmp/session/speed.tgz (results/bench
# and the steps' logs). bench/gpu_wait.sh waits for them and hands them back.
#
#   PLAN=bench/plans/quality-11.txt Q_S=780 S_S=420 SPEED_SKIP="serve-adapters flex-gemma" \
#     setsid nohup bash bench/gpu_session.sh >/tmp/session.log 2>&1 &
#   bash bench/gpu_wait.sh 540          # in this and the following calls, until it says "session done"
#
# Q_S: seconds from now to the queue's deadline (bench/queue_gpu.sh; a later call may move it in /tmp/rq/deadline);
# S_S: seconds the speed steps get once the queue is done (0: the queue alone, no exports made beside it); N: runs at
# once (default 4); PLAN=none: speed steps only.
# INFWHEELS (default /tmp/infw): infinity-emb's staged wheels (bench/serve_gpu_wheels.sh), installed once into INFSITE
# (default /tmp/infsite) for the serving comparison; without them the steps that start infinity-emb belong in SPEED_SKIP.
set -u
PLAN=${PLAN:?PLAN: a plan file of bench/plans, or none}
rm -rf /tmp/repo /tmp/rq /tmp/session && mkdir -p /tmp/repo /tmp/rq /tmp/session
cp -r src bench results pyproject.toml /tmp/repo
cd /tmp/repo
source bench/gpu_env.sh
export INFSITE=${INFSITE:-/tmp/infsite}
infwheels=$(find "${INFWHEELS:-/tmp/infw}" -name '*.whl' 2>/dev/null)
if [ -n "$infwheels" ] && [ ! -d "$INFSITE/infinity_emb" ]; then
  python3 -m pip install -q --no-index --no-deps --target "$INFSITE" $infwheels
fi
echo "session start $(date -u +%FT%TZ) on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
if [ "$PLAN" = none ]; then
  touch /tmp/rq/done
else
  echo $(( $(date +%s) + ${Q_S:-780} )) > /tmp/rq/deadline
  (PLAN=$PLAN N=${N:-4} setsid nohup bash bench/queue_gpu.sh >/tmp/rq/driver.log 2>&1 &)
  # the queue converts the packaged models into the cache first: the exports wait for that, not convert beside it
  for _ in $(seq 200); do grep -q "resolved in" /tmp/rq/driver.log 2>/dev/null && break; sleep 3; done
fi
S_S=${S_S:-420}
if [ "$S_S" != 0 ]; then
  ONLY=train LOGS=/tmp/session/prepare bash bench/speed_gpu.sh  # the runs to serve, made beside the queue
  echo "exports ready $(date -u +%T)"
fi
until [ -f /tmp/rq/done ]; do sleep 3; done
if [ "$PLAN" != none ]; then
  (cd /tmp/rq && tar czf /tmp/session/quality.tgz.tmp driver.log $(ls -- */reproduce.tgz */runner.log */eval.log \
    2>/dev/null) && mv /tmp/session/quality.tgz.tmp /tmp/session/quality.tgz)
  echo "quality packed $(date -u +%T)"
fi
if [ "$S_S" != 0 ]; then
  DEADLINE=$(( $(date +%s) + S_S )) SKIP="train ${SPEED_SKIP:-}" LOGS=/tmp/session/speed bash bench/speed_gpu.sh
  tar czf /tmp/session/speed.tgz.tmp -C /tmp/repo results/bench -C /tmp/session prepare speed \
    && mv /tmp/session/speed.tgz.tmp /tmp/session/speed.tgz
fi
echo "session done $(date -u +%T)"
touch /tmp/session/done
