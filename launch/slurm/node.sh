#!/bin/bash
# One node's share of a MODUS job; train.sbatch starts it through srun, one task per node.
#
# torchrun starts this node's MODUS_GPUS_PER_NODE trainer processes, which meet the other
# nodes through torchrun's c10d rendezvous at MODUS_RDZV_HOST:MODUS_RDZV_PORT. SIGUSR1 (the
# time limit is near, or the job is being preempted) is passed to the trainers, which save a
# checkpoint and exit; SIGTERM is passed to torchrun, which stops its trainers.
#
# Arguments: the trainer's own (e.g. --config configs/7b.json --set training.steps=1000).
set -uo pipefail

: "${MODUS_PYTHON:?set by train.sbatch}" "${MODUS_ENTRY:?}" "${MODUS_GPUS_PER_NODE:?}" "${MODUS_NNODES:?}"
: "${MODUS_RDZV_HOST:?}" "${MODUS_RDZV_PORT:?}" "${MODUS_LOG_DIR:?}"
node="${SLURM_NODEID:?srun sets SLURM_NODEID}"

# torchrun itself must survive SIGUSR1 (Python's default action would end it and orphan the
# trainers), so it runs with a no-op handler; the trainers start with the default disposition.
"${MODUS_PYTHON}" -c '
import signal, sys
signal.signal(signal.SIGUSR1, lambda *_: None)
from torch.distributed.run import main
sys.argv[0] = "torchrun"
main()
' \
  --nnodes="${MODUS_NNODES}" \
  --nproc-per-node="${MODUS_GPUS_PER_NODE}" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="${MODUS_RDZV_HOST}:${MODUS_RDZV_PORT}" \
  --rdzv-id="${SLURM_JOB_ID:-modus}" \
  --rdzv-conf="join_timeout=${MODUS_RDZV_TIMEOUT:-900}" \
  --max-restarts="${MODUS_MAX_RESTARTS:-0}" \
  --log-dir="${MODUS_LOG_DIR}/ranks/node${node}" \
  --tee=3 \
  --local-ranks-filter=0 \
  "${MODUS_ENTRY}" "$@" &
torchrun_pid=$!

on_usr1() {
  echo "node ${node}: SIGUSR1 -> trainers (checkpoint and exit)"
  pkill -USR1 -P "${torchrun_pid}" || true  # the trainers are torchrun's children
}
on_term() {
  echo "node ${node}: SIGTERM -> torchrun"
  kill -TERM "${torchrun_pid}" 2>/dev/null || true
}
trap on_usr1 USR1
trap on_term TERM

# A trapped signal interrupts `wait`; keep waiting until torchrun has really exited.
while true; do
  wait "${torchrun_pid}"
  status=$?
  kill -0 "${torchrun_pid}" 2>/dev/null || break
done
exit "${status}"
