#!/usr/bin/env bash
# Trained states (`quality_sweep.py --save-predictors`, /tmp/states on the device machine) carried between sessions,
# so a later session's lanes reuse a stage A instead of training it again (an 8k stage A is 150-280 s of device time).
# A call sends back at most 8 files, 64 MiB together, and carries at most 64 MiB; an 8k state is ~70 MB. So a state
# travels as 15-MiB parts with one MANIFEST line (sha256, name, number of parts), four parts a call each way, and is
# put together only once every part is there and its sha256 matches.
#   there: bash scripts/gpu_states.sh out NAME[,NAME] [STATES] [OUT] [FROM] -> parts FROM..FROM+3 (counted over the
#                                                   names in order) and MANIFEST; prints the call for the rest
#   here:  bash scripts/gpu_states.sh keep /work/.device/N [KEPT]           -> KEPT (.states); parts of one state may
#                                                   come from several calls; a name whose sha256 changed replaces its
#                                                   older parts
#   here:  bash scripts/gpu_states.sh plan [KEPT]                           -> the carry list of each call that brings
#                                                   KEPT to the device (four parts and the MANIFEST a call)
#   there: bash scripts/gpu_states.sh in [KEPT] [STATES] [PARTS]            -> parts gather in PARTS (/tmp survives
#                                                   between calls); STATES/NAME.pt once all are there and checked
#                                                   (gpu_setup.sh runs it when .states is carried)
set -euo pipefail
shopt -s nullglob # a name with no parts in a folder gives an empty list, not the pattern itself
PARTS_PER_CALL=4 # 4 x 15 MiB + the MANIFEST: under the 64 MiB and the 8 files a call sends back or carries
verb="${1:?out, keep, plan or in}"

sum_of() { sha256sum | cut -d' ' -f1; }
count() { echo $#; }
# MANIFEST lines of FILE without NAME's
others() { grep -v " $2 " "$1" || true; }

case "$verb" in
out)
  names="${2:?NAME[,NAME]}" states="${3:-/tmp/states}" out="${4:-${OUT:-/tmp/out}}" from="${5:-0}"
  mkdir -p "$out" && : > "$out/MANIFEST"
  work="$(mktemp -d)" && trap 'rm -rf "$work"' EXIT
  index=0 sent=0 total=0
  for name in ${names//,/ }; do
    f="$states/$name.pt"
    [ -f "$f" ] || { echo "gpu_states out: no $f (there: $(ls "$states" 2>/dev/null | tr '\n' ' '))" >&2; exit 2; }
    split -b 15M -a 1 "$f" "$work/$name.pt.part-"
    parts=("$work/$name".pt.part-*)
    echo "$(sum_of < "$f") $name ${#parts[@]}" >> "$out/MANIFEST"
    for p in "${parts[@]}"; do
      if [ "$index" -ge "$from" ] && [ "$sent" -lt "$PARTS_PER_CALL" ]; then
        mv "$p" "$out/" && sent=$((sent + 1))
      fi
      index=$((index + 1))
    done
  done
  total=$index
  cat "$out/MANIFEST"
  echo "gpu_states out: parts $((from + 1))-$((from + sent)) of $total sent"
  if [ $((from + sent)) -lt "$total" ]; then
    echo "the rest: bash scripts/gpu_states.sh out $names $states \$OUT $((from + sent))"
  fi
  ;;
keep)
  from="${2:?the folder where the files of the call landed}" kept="${3:-.states}"
  [ -f "$from/MANIFEST" ] || { echo "gpu_states keep: $from/MANIFEST is not there (not an 'out' call?)" >&2; exit 2; }
  mkdir -p "$kept" && touch "$kept/MANIFEST"
  while read -r sum name parts; do
    if ! grep -qx "$sum $name $parts" "$kept/MANIFEST"; then # a new state, or this name trained again
      rm -f "$kept/$name".pt.part-*
      { others "$kept/MANIFEST" "$name"; echo "$sum $name $parts"; } > "$kept/MANIFEST.new"
      mv "$kept/MANIFEST.new" "$kept/MANIFEST"
    fi
    for p in "$from/$name".pt.part-*; do cp "$p" "$kept/"; done
    have="$(count "$kept/$name".pt.part-*)"
    if [ "$have" -lt "$parts" ]; then
      echo "$kept/$name.pt: $have of $parts parts kept; the rest come from the next 'out' call"
      continue
    fi
    if [ "$(cat "$kept/$name".pt.part-* | sum_of)" != "$sum" ]; then
      rm -f "$kept/$name".pt.part-*
      others "$kept/MANIFEST" "$name" > "$kept/MANIFEST.new" && mv "$kept/MANIFEST.new" "$kept/MANIFEST"
      echo "gpu_states keep: $name.pt's parts do not match their sha256; dropped" >&2
      exit 1
    fi
    echo "$kept/$name.pt: all $parts parts kept and checked"
  done < "$from/MANIFEST"
  ;;
plan)
  kept="${2:-.states}"
  [ -f "$kept/MANIFEST" ] || { echo "gpu_states plan: nothing kept in $kept" >&2; exit 2; }
  files=("$kept"/*.pt.part-*)
  call=1
  for ((i = 0; i < ${#files[@]}; i += PARTS_PER_CALL)); do
    echo "call $call: carry $kept/MANIFEST ${files[*]:i:PARTS_PER_CALL}"
    call=$((call + 1))
  done
  ;;
in)
  kept="${2:-.states}" states="${3:-/tmp/states}" gathered="${4:-/tmp/states-parts}"
  [ -f "$kept/MANIFEST" ] || exit 0
  mkdir -p "$states" "$gathered"
  while read -r sum name parts; do
    [ -f "$states/$name.pt" ] && continue
    if [ -f "$gathered/$name.sum" ] && [ "$(cat "$gathered/$name.sum")" != "$sum" ]; then
      rm -f "$gathered/$name".pt.part-* # parts of an older training of this name
    fi
    echo "$sum" > "$gathered/$name.sum"
    for p in "$kept/$name".pt.part-*; do cp "$p" "$gathered/"; done
    have="$(count "$gathered/$name".pt.part-*)"
    if [ "$have" -lt "$parts" ]; then
      echo "state $name: $have of $parts parts here; carry the rest in the next call" >&2 && continue
    fi
    cat "$gathered/$name".pt.part-* > "$states/$name.pt.carried"
    if [ "$(sum_of < "$states/$name.pt.carried")" = "$sum" ]; then
      mv "$states/$name.pt.carried" "$states/$name.pt" && rm -f "$gathered/$name".*
      echo "state $name: carried in"
    else
      rm -f "$states/$name.pt.carried" "$gathered/$name".*
      echo "state $name: checksum mismatch, left out" >&2
    fi
  done < "$kept/MANIFEST"
  ;;
*) echo "gpu_states: unknown verb $verb (out, keep, plan or in)" >&2; exit 2 ;;
esac
