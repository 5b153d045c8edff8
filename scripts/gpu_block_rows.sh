#!/usr/bin/env bash
# Issue 20 on the device machine: the block-row predictor beside the token-row one and dense FlashAttention,
# in the same run (benchmarks/attention_bench.py), then a stage profile of each at one length.
#   bash scripts/gpu_block_rows.sh            (carry .whl: pydantic's cp312 wheels)
#   LENGTHS="4096 32768" PROFILE_T=32768 ARGS="--compile" bash scripts/gpu_block_rows.sh
set -euo pipefail
source scripts/gpu_setup.sh
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
python3 benchmarks/attention_bench.py --kv-heads 8 --predictor-rows token block --no-density-budget \
  --lengths ${LENGTHS:-4096 8192 16384 32768 65536 131072} --json "$OUT/attention_block_rows.json" ${ARGS:-} 2>&1 \
  | tee "$OUT/attention_block_rows.log"
for rows in token block; do
  python3 benchmarks/profile_sea_layer.py --T "${PROFILE_T:-32768}" --kv-heads 8 --predictor-rows "$rows" --rows 25 ${ARGS:-} 2>&1 \
    | tee "$OUT/profile_${rows}.log" | head -60
done
