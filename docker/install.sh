#!/usr/bin/env bash
# The image install steps, run by both Dockerfiles and by CI (tests/test_deploy_images.py):
#   docker/install.sh gpu|api VENV [--dry-run]
# 1. a fresh virtual environment at VENV with the pinned uv;
# 2. `uv pip sync --require-hashes` of requirements/lock-<image>.txt: exactly the locked set, every
#    wheel checked against its hash, nothing resolved at build time;
# 3. the project itself, without dependencies (the lock has them), editable so that recipes/ and
#    `python -m workers.service.ray_job` work from /opt/sea-convert.
# --dry-run resolves and checks step 2 and 3 against the index without installing (the GPU set is
# about 3 GB of CUDA wheels; CI cannot hold a GPU image, but it can check that the lock installs).
set -euo pipefail
IMAGE="${1:?usage: docker/install.sh gpu|api VENV [--dry-run]}"
VENV="${2:?usage: docker/install.sh gpu|api VENV [--dry-run]}"
DRY="${3:-}"
UV_VERSION="0.13.9"
SRC="$(cd "$(dirname "$0")/.." && pwd)"
LOCK="$SRC/requirements/lock-$IMAGE.txt"
[ -f "$LOCK" ] || { echo "docker/install.sh: no lock file $LOCK (image must be gpu or api)" >&2; exit 2; }
case "$DRY" in ""|--dry-run) ;; *) echo "docker/install.sh: unknown option $DRY" >&2; exit 2;; esac

PYTHON="${PYTHON:-python3}"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --no-cache-dir --disable-pip-version-check -q "uv==$UV_VERSION"
uv() { "$VENV/bin/uv" "$@"; }
export UV_NO_CACHE=1 UV_LINK_MODE=copy
uv pip sync --python "$VENV/bin/python" --require-hashes $DRY "$LOCK"
uv pip install --python "$VENV/bin/python" --no-deps $DRY -e "$SRC"
if [ -z "$DRY" ]; then  # the image's entry modules import with exactly the locked set
  case "$IMAGE" in
    gpu) "$VENV/bin/python" -c "import torch, triton, transformers, ray, api.app, workers.train.train_worker, workers.service.ray_job" ;;
    api) "$VENV/bin/python" -c "import sys, api.app, api.cli; assert 'torch' not in sys.modules" ;;
  esac
  echo "docker/install.sh: $IMAGE environment ready at $VENV"
fi
