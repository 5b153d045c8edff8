#!/usr/bin/env bash
# Regenerate the image lock files (hash-pinned, Linux x86_64, CPython 3.11, the images' interpreter):
#   requirements/lock-gpu.txt  the project's dependencies + triton, torch pinned (CUDA wheels from PyPI)
#   requirements/lock-api.txt  the service's dependencies only (requirements/api.in), no torch
# Versions follow requirements/constraints.txt, the set the test suite runs with; triton follows
# torch (the CPU test environment keeps an older triton for TRITON_INTERPRET).
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION="${UV_VERSION:-0.13.9}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/uv" && "$tmp/uv/bin/pip" install -q "uv==${UV_VERSION}"
grep -v '^triton==' requirements/constraints.txt > "$tmp/constraints.txt"
echo "torch==${TORCH_VERSION}" >> "$tmp/constraints.txt"
compile() { "$tmp/uv/bin/uv" pip compile --quiet --generate-hashes --python-version 3.11 \
  --python-platform x86_64-manylinux_2_28 -c "$tmp/constraints.txt" --custom-compile-command "scripts/lock.sh" "$@"; }
compile pyproject.toml --extra service --extra triton -o requirements/lock-gpu.txt
compile requirements/api.in -o requirements/lock-api.txt
echo "wrote requirements/lock-gpu.txt ($(grep -c '==' requirements/lock-gpu.txt) pins) and requirements/lock-api.txt ($(grep -c '==' requirements/lock-api.txt) pins)"
