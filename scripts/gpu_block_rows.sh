#!/usr/bin/env bash
# Issue 20 on the device machine, one call: the block-row kernels checked at real shapes; the 32k stage profile
# (which estimator path is faster); the one-layer decode step; the block-row predictor beside the token-row one
# and dense FlashAttention in the same run (benchmarks/attention_bench.py, eager and replayed from a CUDA graph);
# the other profiles.
#   bash scripts/gpu_block_rows.sh            (carry .whl: pydantic's cp312 wheels)
#   TESTS=0 BENCH=0 DECODE=0 PROFILE_T="" skip a part (two calls when one would pass the 10-minute limit); TUNE=1 adds
#   the block-sparse forward's launch settings, timed side by side (TUNE_ARGS narrows them); TUNE_ESTIMATOR=1 the block-row estimator's
#   (paths and launch settings); TUNE_BACKWARD=1 the block-sparse backward's dk/dv launch; TRAIN_PROFILE=32768 profiles the training step (forward + backward) at that T
#   LENGTHS="4096 32768" PROFILE_T="32768" ROWS="block" ARGS="--compile" bash scripts/gpu_block_rows.sh
set -euo pipefail
source scripts/gpu_setup.sh
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if [ "${TESTS:-1}" = 1 ]; then
python3 -m pytest -q -p no:cacheprovider -s tests/test_triton_kernels.py tests/test_gpu_integration.py \
  -k "gated or block_linear or block_rows_estimate or block_scores or select_key_blocks or cuda_graph or block_sparse_bf16 or splits_long" 2>&1 | tee "$OUT/gpu_tests.log" | tail -5 \
  || echo "GPU tests FAILED (gpu_tests.log); timing the rest anyway: a device call is too dear to stop here"
fi
if [ "${TUNE:-0}" = 1 ]; then  # the block-sparse forward's launch settings (benchmarks/tune_block_sparse.py)
  python3 benchmarks/tune_block_sparse.py --json "$OUT/tune_block_sparse.json" ${TUNE_ARGS:-} 2>&1 \
    | tee "$OUT/tune_block_sparse.log" | grep -v "^    {" | head -40
fi
if [ "${TUNE_BACKWARD:-0}" = 1 ]; then  # the backward's dk/dv launch settings
  python3 benchmarks/tune_block_sparse.py --backward --lengths 32768 --max-rows 64 128 --warps 4 8 --stages 1 2 3 \
    --json "$OUT/tune_block_sparse_backward.json" 2>&1 | tee "$OUT/tune_block_sparse_backward.log" | grep -v "^    {" | head -20
fi
if [ "${TUNE_ESTIMATOR:-0}" = 1 ]; then  # benchmarks/tune_block_estimator.py
  python3 benchmarks/tune_block_estimator.py --json "$OUT/tune_block_estimator.json" 2>&1 | grep -v "^    {" \
    | tee "$OUT/tune_block_estimator.log" | head -60
fi
if [ -n "${TRAIN_PROFILE:-}" ]; then
  python3 benchmarks/profile_sea_layer.py --T "$TRAIN_PROFILE" --kv-heads 8 --predictor-rows block --rows 40 --backward \
    ${ARGS:---compile} 2>&1 | grep -v "Warn\|warn" > "$OUT/profile_train_$TRAIN_PROFILE.log"
  head -30 "$OUT/profile_train_$TRAIN_PROFILE.log"
fi
# the 32k profile first: its stages decide the estimator path (docs/benchmarks.md)
profile() {
  python3 benchmarks/profile_sea_layer.py --T "$1" --kv-heads 8 --predictor-rows block --rows 45 ${ARGS:---compile} 2>&1 \
    | grep -v "Warn\|warn" > "$OUT/profile_block_$1.log"
  head -11 "$OUT/profile_block_$1.log"
}
PROFILES="${PROFILE_T-32768 131072}"
FIRST="${PROFILES%% *}"
[ -n "$FIRST" ] && profile "$FIRST"
if [ "${DECODE:-1}" = 1 ]; then
  python3 benchmarks/decode_bench.py --predictor-rows block --json "$OUT/decode_block.json" 2>&1 | grep -v "Warn\|warn" | tail -8
fi
if [ "${BENCH:-1}" = 1 ]; then
python3 benchmarks/attention_bench.py --kv-heads 8 --predictor-rows ${ROWS:-token block} --no-density-budget --cuda-graph \
  --lengths ${LENGTHS:-4096 8192 16384 32768 65536 131072} --json "$OUT/attention_block_rows.json" ${ARGS:---compile} 2>&1 \
  | tee "$OUT/attention_block_rows.log" | grep "^T="
fi
for T in ${PROFILES#"$FIRST"}; do profile "$T"; done
