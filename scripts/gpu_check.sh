#!/usr/bin/env bash
# The GPU verification in one command, for one H100/H200 with a preinstalled CUDA torch, nvcc
# and no internet, within 8 minutes:
#
#   bash scripts/gpu_check.sh OUTDIR [stage ...]     # all stages, or the named ones (a rerun)
#   bash scripts/gpu_check.sh --dry-run OUTDIR       # (or GPU_CHECK_DRY=1) wiring only, no CUDA
#
# Stages, in order, each with a time budget in seconds (a stage runs under `timeout` of its
# budget; one whose budget exceeds what is left of GPU_CHECK_TOTAL_S, 480 by default, is
# skipped with a note):
#   env        nvidia-smi, python, torch, CUDA and nvcc versions            -> env.json
#   install    the carried wheels (.whl/, from scripts/gpu_wheels.sh) into OUTDIR/site, on
#              PYTHONPATH so the preinstalled CUDA torch stays visible; the CUDA extension
#              built in place for sm_90a only (TORCH_CUDA_ARCH_LIST=9.0a)
#   kernels    pytest tests/kernels tests/ops and the FP8 linears on the hardware -> kernels.xml
#   attention  bench/attention/bench_attention.py: extension vs compiled FlexAttention vs
#              SDPA, 8k and 32k tokens, 28/4 heads and the tp = 4 shape 7/1, both masks
#                                                                           -> attention_28x4.json, attention_7x1.json
#   mot_step   bench/training/bench_mot_step.py: 4 layers at 7B width, 32k tokens, bf16 vs FP8
#                                                                           -> mot_step.json
#   sanitizer  compute-sanitizer memcheck and racecheck on a small extension forward + backward
#   pretrain   launch/pretrain.py on one GPU (NCCL, bf16), tiny model at head dim 64, 10 steps
#                                                                           -> pretrain/metrics.jsonl
# Every stage's output goes to OUTDIR/<stage>.log; OUTDIR/results.json and OUTDIR/summary.md
# are rewritten after each stage, so an interrupted run still reports what it did.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}

DRY=${GPU_CHECK_DRY:-0}
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -lt 1 ]; then
  echo "usage: bash scripts/gpu_check.sh [--dry-run] OUTDIR [stage ...]" >&2
  exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
shift

STAGES=(env install kernels attention mot_step sanitizer pretrain)
declare -A BUDGET=([env]=20 [install]=120 [kernels]=90 [attention]=150 [mot_step]=60 [sanitizer]=90 [pretrain]=60)
TOTAL_S=${GPU_CHECK_TOTAL_S:-480}
SELECTED=("$@")
if [ ${#SELECTED[@]} -eq 0 ]; then SELECTED=("${STAGES[@]}"); fi
for s in "${SELECTED[@]}"; do
  if [ -z "${BUDGET[$s]:-}" ]; then
    echo "unknown stage '$s'; stages: ${STAGES[*]}" >&2
    exit 2
  fi
done

SITE="$OUT/site"
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} WANDB_MODE=disabled
STATUS_FILE="$OUT/stages.tsv"   # stage, status, seconds, note
: > "$STATUS_FILE"
START=$(date +%s)

# ----------------------------------------------------------------------------- stage commands
# Each prints the commands of its stage, one per line; run_stage runs them in order.

cmds_env() {
  echo "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv"
  echo "$PY -c 'import json, platform, subprocess, torch; nvcc = subprocess.run([\"nvcc\", \"--version\"], capture_output=True, text=True).stdout.strip().splitlines(); json.dump({\"python\": platform.python_version(), \"torch\": torch.__version__, \"cuda\": torch.version.cuda, \"device\": torch.cuda.get_device_name() if torch.cuda.is_available() else None, \"capability\": list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None, \"nvcc\": nvcc[-1] if nvcc else None}, open(\"$OUT/env.json\", \"w\"), indent=2)'"
  echo "cat $OUT/env.json"
}

cmds_install() {
  echo "$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE $REPO/.whl/*.whl"
  echo "$PY -c 'import deepspeed, megatron.core, torchao, torch; print(\"deepspeed\", deepspeed.__version__, \"torchao\", torchao.__version__, \"torch\", torch.__version__, torch.__file__)'"
  echo "env TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 $PY setup.py build_ext --inplace"
  echo "$PY -c 'from modus_mega.ops.cuda_attention import HAVE_CUDA_ATTENTION as ok; print(\"extension built:\", ok); raise SystemExit(0 if ok else 1)'"
}

cmds_kernels() {
  echo "$PY -m pytest -q -p no:cacheprovider --junitxml=$OUT/kernels.xml tests/kernels tests/ops tests/parallel_fp8/test_fp8_cuda.py"
}

cmds_attention() {
  local common="--tokens 8192 32768 --masks causal_docs modus --backends cuda flex sdpa --warmup 2 --iters 5"
  echo "$PY bench/attention/bench_attention.py $common --q-heads 28 --kv-heads 4 --json $OUT/attention_28x4.json"
  echo "$PY bench/attention/bench_attention.py $common --q-heads 7 --kv-heads 1 --json $OUT/attention_7x1.json"
}

cmds_mot_step() {
  echo "$PY bench/training/bench_mot_step.py --layers 4 --tokens 32768 --json $OUT/mot_step.json"
}

SANITIZE_CASE="import torch; from modus_mega.ops.attention import get_attention_backend; from modus_mega.ops.mask import lo_hi_for_layout; lo, hi = lo_hi_for_layout([[('causal', 100), ('full', 64), ('noise', 64)], [('causal', 30)]]); attn = get_attention_backend('cuda', 'cuda'); q, k, v = (torch.randn(258, h, 128, device='cuda', dtype=torch.bfloat16, requires_grad=True) for h in (4, 2, 2)); out = attn.forward(q, k, v, attn.prepare(lo.cuda(), hi.cuda()), 128 ** -0.5); out.sum().backward(); torch.cuda.synchronize(); print('ok', out.shape)"

cmds_sanitizer() {
  echo "compute-sanitizer --tool memcheck --error-exitcode 1 $PY -c \"$SANITIZE_CASE\""
  echo "compute-sanitizer --tool racecheck --error-exitcode 1 $PY -c \"$SANITIZE_CASE\""
}

cmds_pretrain() {
  local sets="--set training.steps=10 --set training.log_every=1 --set training.run_dir=$OUT/pretrain --set model.llm.head_dim=64 --set model.attention_backend=auto --set training.wandb_mode=disabled"
  echo "$PY launch/pretrain.py --config configs/tiny.json $sets"
  echo "test -s $OUT/pretrain/metrics.jsonl"
}

# Files each stage needs (checked in the dry run and before the stage runs).
files_of() {
  case $1 in
    install) echo "setup.py csrc/build.py csrc/modus_attn" ;;
    kernels) echo "tests/kernels tests/ops tests/parallel_fp8/test_fp8_cuda.py" ;;
    attention) echo "bench/attention/bench_attention.py" ;;
    mot_step) echo "bench/training/bench_mot_step.py configs/7b.json" ;;
    pretrain) echo "launch/pretrain.py configs/tiny.json" ;;
  esac
}

# ----------------------------------------------------------------------------- running

record() {  # stage status seconds note
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STATUS_FILE"
  write_reports
}

run_stage() {
  local stage=$1 budget=${BUDGET[$1]} log="$OUT/$1.log"
  local elapsed=$(( $(date +%s) - START ))
  local left=$(( TOTAL_S - elapsed ))
  local missing=""
  for f in $(files_of "$stage"); do [ -e "$f" ] || missing="$missing $f"; done
  if [ "$stage" = install ] && ! compgen -G ".whl/*.whl" > /dev/null; then
    missing="$missing .whl/*.whl (run scripts/gpu_wheels.sh where pip reaches PyPI)"
  fi
  echo "== $stage (budget ${budget}s, ${left}s of ${TOTAL_S}s left)"
  if [ "$DRY" = 1 ]; then
    cmds_"$stage" | sed 's/^/   would run: /'
    [ -z "$missing" ] && record "$stage" dry 0 "commands resolved" || record "$stage" dry 0 "missing:$missing"
    return
  fi
  if [ -n "$missing" ]; then
    echo "   failed: missing$missing"
    record "$stage" failed 0 "missing:$missing"
    return
  fi
  if [ "$left" -lt "$budget" ]; then
    echo "   skipped: ${left}s left, budget ${budget}s; rerun with: bash scripts/gpu_check.sh $OUT $stage"
    record "$stage" skipped 0 "time: ${left}s left of the total, budget ${budget}s"
    return
  fi
  local t0=$(date +%s) status=ok note="" cmd rc
  : > "$log"
  while IFS= read -r cmd; do
    echo "\$ $cmd" >> "$log"
    local remaining=$(( budget - ($(date +%s) - t0) ))
    timeout --kill-after=10 $(( remaining > 1 ? remaining : 1 )) bash -c "$cmd" >> "$log" 2>&1
    rc=$?
    if [ $rc -ne 0 ]; then
      if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=timeout; else status=failed; fi
      note="exit $rc: $cmd"
      break
    fi
  done < <(cmds_"$stage")
  local secs=$(( $(date +%s) - t0 ))
  echo "   $status in ${secs}s (log: $log)"
  [ "$status" = ok ] || tail -n 15 "$log" | sed 's/^/   | /'
  record "$stage" "$status" "$secs" "$note"
}

write_reports() {
  "$PY" - "$OUT" "$DRY" <<'EOF'
import json
import sys
from pathlib import Path

out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
stages = []
for line in (out / "stages.tsv").read_text().splitlines():
    name, status, seconds, note = line.split("\t")
    stages.append({"stage": name, "status": status, "seconds": int(seconds), "note": note})
figures = {}
for name in ("env", "attention_28x4", "attention_7x1", "mot_step"):
    path = out / f"{name}.json"
    if path.is_file():
        try:
            figures[name] = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            figures[name] = {"unreadable": str(error)}
(out / "results.json").write_text(json.dumps({"dry_run": dry, "stages": stages, "figures": figures}, indent=2))
lines = ["# GPU check" + (" (dry run: wiring only)" if dry else ""), "", "| stage | status | seconds | note |", "|---|---|---|---|"]
lines += [f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['note']} |" for s in stages]
mot = figures.get("mot_step")
if mot and "results" in mot:
    lines += ["", f"MoT step ({mot['layers']} layers, {mot['tokens']} tokens, FP8 recipe {mot['recipe']}):", ""]
    lines += [f"- {r['precision']}: {r['tokens_per_s']:.0f} tokens/s, {r['tflops']:.1f} TFLOP/s, MFU {r['mfu']:.1%}" for r in mot["results"]]
    lines += [f"- FP8 / bf16 tokens/s: {mot['fp8_over_bf16_tokens_per_s']:.2f}x (target 1.3x); bf16 MFU target 45%"]
(out / "summary.md").write_text("\n".join(lines) + "\n")
EOF
}

for stage in "${STAGES[@]}"; do
  for s in "${SELECTED[@]}"; do
    [ "$s" = "$stage" ] && run_stage "$stage"
  done
done
echo "results: $OUT/results.json, $OUT/summary.md"
! grep -qP '\t(failed|timeout)\t' "$STATUS_FILE"
