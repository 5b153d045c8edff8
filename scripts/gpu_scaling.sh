#!/usr/bin/env bash
# The parallel stage A benchmark on a multi-GPU device machine (issue 6): set-up, then
# benchmarks/distributed_scaling.py with its JSON and log under $OUT (the run folders under /tmp/scaling).
#   bash scripts/gpu_scaling.sh llama13b:2,llama13b:1          (carry .stage1 .whl; no GGUF needed)
#   bash scripts/gpu_scaling.sh smollm2:1,smollm2:2            (carry .stage2 next, while the machine is warm)
#   ARGS="--batch 32 --compile" bash scripts/gpu_scaling.sh ...  (options of the benchmark)
set -euo pipefail
source scripts/gpu_setup.sh
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'GPUs', torch.cuda.device_count())"
# the runs' folders (checkpoints, predictors: dozens of files) stay in /tmp; $OUT, which brings back at most 8 files,
# gets the table's JSON and the log
RUNS_DIR="${RUNS_DIR:-/tmp/scaling}"
rm -rf "$RUNS_DIR"  # a run folder left by an earlier call on a warm machine would make its run resume
TAG="$(echo "$1" | tr ':,' '-_')"  # names this call's log and JSON
python3 benchmarks/distributed_scaling.py --runs "$1" --steps "${STEPS:-8}" --out "$RUNS_DIR" ${ARGS:-} 2>&1 \
  | grep --line-buffered -v "Loading weights\|Writing model" | tee -a "$OUT/scaling-$TAG.log"
cp "$RUNS_DIR/distributed_scaling.json" "$OUT/distributed_scaling-$TAG.json"
