#!/usr/bin/env bash
# Trained states (`quality_sweep.py --save-predictors`, /tmp/states on the device machine) carried between sessions,
# so a later session's lanes reuse a stage A instead of training it again (an 8k stage A is 150-280 s of device time).
# A call sends back at most 8 files of 16 MiB, 64 MiB together, and a state is ~20-35 MB: so parts of 15 MiB and a
# MANIFEST line per state (sha256, name, number of parts).
#   there: bash scripts/gpu_states.sh out NAME[,NAME] [STATES] [OUT]  -> OUT/NAME.pt.part-?, OUT/MANIFEST
#   here:  bash scripts/gpu_states.sh keep /work/.device/N [KEPT]     -> KEPT (.states); a name kept again replaces
#                                                                         its older parts
#   there: bash scripts/gpu_states.sh in [KEPT] [STATES]              -> STATES/NAME.pt once checked against its
#                                                                         sha256 (gpu_setup.sh runs it when .states is
#                                                                         carried); a state the machine has is kept
set -euo pipefail
verb="${1:?out, keep or in}"
case "$verb" in
out)
  names="${2:?NAME[,NAME]}" states="${3:-/tmp/states}" out="${4:-${OUT:-/tmp/out}}"
  mkdir -p "$out" && : > "$out/MANIFEST"
  for name in ${names//,/ }; do
    f="$states/$name.pt"
    [ -f "$f" ] || { echo "gpu_states out: no $f (there: $(ls "$states" | tr '\n' ' '))" >&2; exit 2; }
    split -b 15M -a 1 "$f" "$out/$name.pt.part-"
    echo "$(sha256sum < "$f" | cut -d' ' -f1) $name $(ls "$out/$name.pt.part-"* | wc -l)" >> "$out/MANIFEST"
  done
  cat "$out/MANIFEST"
  ;;
keep)
  from="${2:?the folder where the files of the call landed}" kept="${3:-.states}"
  [ -f "$from/MANIFEST" ] || { echo "gpu_states keep: $from/MANIFEST is not there (not an 'out' call?)" >&2; exit 2; }
  mkdir -p "$kept" && touch "$kept/MANIFEST"
  while read -r sum name parts; do
    got="$(cat "$from/$name".pt.part-* | sha256sum | cut -d' ' -f1)"
    [ "$got" = "$sum" ] || { echo "gpu_states keep: $from/$name.pt parts do not match their sha256" >&2; exit 1; }
    rm -f "$kept/$name".pt.part-* && cp "$from/$name".pt.part-* "$kept/"
    { grep -v " $name " "$kept/MANIFEST" || true; echo "$sum $name $parts"; } > "$kept/MANIFEST.new"
    mv "$kept/MANIFEST.new" "$kept/MANIFEST"
    echo "$kept/$name.pt: $parts parts"
  done < "$from/MANIFEST"
  ;;
in)
  kept="${2:-.states}" states="${3:-/tmp/states}"
  [ -f "$kept/MANIFEST" ] || exit 0
  mkdir -p "$states"
  while read -r sum name parts; do
    [ -f "$states/$name.pt" ] && continue
    if [ "$(ls "$kept/$name".pt.part-* 2>/dev/null | wc -l)" != "$parts" ]; then
      echo "state $name: parts missing, left out" >&2 && continue
    fi
    cat "$kept/$name".pt.part-* > "$states/$name.pt.carried"
    if [ "$(sha256sum < "$states/$name.pt.carried" | cut -d' ' -f1)" = "$sum" ]; then
      mv "$states/$name.pt.carried" "$states/$name.pt" && echo "state $name: carried in"
    else
      rm -f "$states/$name.pt.carried" && echo "state $name: checksum mismatch, left out" >&2
    fi
  done < "$kept/MANIFEST"
  ;;
*) echo "gpu_states: unknown verb $verb (out, keep or in)" >&2; exit 2 ;;
esac
