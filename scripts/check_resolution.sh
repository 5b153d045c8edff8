#!/usr/bin/env bash
# Do the ranges in pyproject.toml resolve with pip alone, as a user's `pip install -e .` and
# `pip install -e ".[dev]"` would: a fresh virtual environment, torch pinned first (as scripts/install.sh
# does), no requirements/constraints.txt and no machine-wide pip configuration (PIP_CONFIG_FILE=/dev/null
# drops this machine's own constraint file). Dry runs: nothing is installed but torch (or its metadata).
#   scripts/check_resolution.sh [WORKDIR]     prints the time of each resolve; exit 1 if one fails
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-$(mktemp -d)}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
"$PYTHON" -m venv "$WORK/venv"
# A dry run needs only torch's metadata: where $PYTHON already has this torch, its dist-info folder is copied
# (pip then counts torch as installed, with its requirements) instead of unpacking the 900 MB wheel (~25 s).
TORCH_INFO=$("$PYTHON" -c "import sys, importlib.metadata as m; d = m.distribution('torch'); \
print(d.locate_file(f'torch-{d.version}.dist-info') if d.version.split('+')[0] == sys.argv[1] else '')" "$TORCH_VERSION" 2>/dev/null || true)
if [ -n "$TORCH_INFO" ] && [ -d "$TORCH_INFO" ]; then
  cp -r "$TORCH_INFO" "$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"
else
  "$WORK/venv/bin/python" -m pip install -q "torch==${TORCH_VERSION}" > "$WORK/torch.log" 2>&1
fi
export PIP_CONFIG_FILE=/dev/null
# both resolves at once (two cores; each is mostly one process's work): the slower one sets the time
resolve() {
  local target=$1 tag=$2 start
  start=$(date +%s)
  if "$WORK/venv/bin/python" -m pip install --dry-run --report "$WORK/report-$tag.json" -e "$target" > "$WORK/pip-$tag.log" 2>&1; then
    echo "pip resolves -e '$target' without constraints: $(( $(date +%s) - start )) s, $(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))['install']))" "$WORK/report-$tag.json") distributions"
  else
    echo "pip could NOT resolve -e '$target' without constraints ($(( $(date +%s) - start )) s):" >&2
    tail -n 20 "$WORK/pip-$tag.log" >&2
    return 1
  fi
}
resolve "." base & base=$!
resolve ".[dev]" dev & dev=$!
status=0
wait $base || status=1
wait $dev || status=1
exit $status
