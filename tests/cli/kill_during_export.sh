#!/usr/bin/env bash
# kill -9 at random moments of `mopt quantize --export ...` and `mopt export`:
# the output either does not exist or is complete (it loads), and the input
# model is untouched. Usage: kill_during_export.sh MOPT MODEL WORKDIR
set -euo pipefail
mopt=$1 model=$2 work=$3
rm -rf "$work"
mkdir -p "$work"
digest() { (cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum); }
before=$(digest "$model")
complete_or_absent() {
  if [ -e "$1" ]; then
    "$mopt" inspect "$1" >/dev/null 2>"$work/err" || { echo "FAIL: $1 exists but does not load: $(cat "$work/err")"; exit 1; }
    completed=$((completed + 1))
  else
    absent=$((absent + 1))
  fi
}
completed=0 absent=0
RANDOM=7
for i in $(seq 1 12); do
  delay=$(printf "0.%03d" $((RANDOM % 150)))
  case $((i % 3)) in
    0) out="$work/ct$i"; cmd=("$mopt" quantize "$model" --format int4_rtn --group-size 64 --export compressed-tensors --out "$out") ;;
    1) out="$work/q$i"; cmd=("$mopt" quantize "$model" --format int8_wo --out "$out") ;;
    2) out="$work/m$i.gguf"; cmd=("$mopt" export "$model" --to gguf "$out" --type q4_0) ;;
  esac
  "${cmd[@]}" >/dev/null 2>&1 &
  pid=$!
  sleep "$delay"
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  complete_or_absent "$out"
done
[ "$(digest "$model")" = "$before" ] || { echo "FAIL: the input model changed"; exit 1; }
echo "kill test: $completed outputs complete, $absent absent, none half-written; input unchanged"
rm -rf "$work"
