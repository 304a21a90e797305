#!/bin/bash
# Plan the layout for N GPUs, then submit train.sbatch on N / 8 nodes with the planned config.
#
#   launch/slurm/submit.sh GPUS CONFIG [planner options] [-- trainer options]
#   launch/slurm/submit.sh 32 configs/7b.json
#   launch/slurm/submit.sh 256 configs/7b.json --global-batch-tokens 8388608 -- --set training.steps=20000
#
# The planned config is written to runs/plan/<config>-<GPUS>gpus.json and kept next to the
# job's log. Set SBATCH_* variables (SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT, ...)
# or MODUS_GPUS_PER_NODE for other nodes; everything else comes from train.sbatch.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,10p' "$0" >&2
  exit 2
fi
gpus=$1
config=$2
shift 2
planner_args=()
while [[ $# -gt 0 && "$1" != "--" ]]; do
  planner_args+=("$1")
  shift
done
[[ $# -gt 0 ]] && shift  # drop "--"

cd "$(dirname "$0")/../.."
python="${MODUS_PYTHON:-$PWD/.venv/bin/python}"
per_node="${MODUS_GPUS_PER_NODE:-8}"
if (( gpus % per_node != 0 && gpus > per_node )); then
  echo "submit.sh: ${gpus} GPUs do not fill whole ${per_node}-GPU nodes" >&2
  exit 2
fi
nodes=$(( gpus > per_node ? gpus / per_node : 1 ))
gpus_per_node=$(( gpus < per_node ? gpus : per_node ))
planned="runs/plan/$(basename "${config%.json}")-${gpus}gpus.json"

"${python}" -m modus_mega.plan --config "${config}" --gpus "${gpus}" --out "${planned}" "${planner_args[@]}"
mkdir -p logs/slurm
MODUS_GPUS_PER_NODE="${gpus_per_node}" sbatch --nodes="${nodes}" --gpus-per-node="${gpus_per_node}" \
  --export=ALL launch/slurm/train.sbatch --config "${planned}" "$@"
