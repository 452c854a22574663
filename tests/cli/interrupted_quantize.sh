#!/usr/bin/env bash
# A quantization ended by SIGTERM or SIGINT (a user's Ctrl-C, a job scheduler's kill) leaves neither its
# output nor its OUT.tmp-XXXXXX staging directory behind, and ends by that signal (status 128 + n).
# Each run is stopped once its staging directory exists (calibration done, layers being written);
# the GGUF target also stages a modelopt checkpoint before converting it.
# Usage: interrupted_quantize.sh MOPT MODEL CALIB WORKDIR
set -uo pipefail
mopt=$1 model=$2 calib=$3 work=$4
rm -rf "$work"
mkdir -p "$work"
fail() { echo "FAIL: $*"; exit 1; }
for case in "TERM 143 modelopt" "INT 130 modelopt" "TERM 143 gguf"; do
  read -r sig status target <<< "$case"
  out="$work/q-$sig-$target"
  [ "$target" = gguf ] && out="$out.gguf"
  # Long enough to be stopped midway: AWQ's full search over 128 samples (about 20 s).
  "$mopt" quantize "$model" --format int4_awq --group-size 64 --algo awq_full --calib "$calib" --calib-size 128 \
    --export "$target" --out "$out" > "$work/$sig-$target.log" 2>&1 &
  pid=$!
  staged=""
  for _ in $(seq 600); do
    if compgen -G "$out.tmp-*" > /dev/null; then staged=yes; break; fi
    kill -0 "$pid" 2> /dev/null || break
    sleep 0.05
  done
  [ -n "$staged" ] || fail "$sig $target: no staging directory appeared ($(tail -1 "$work/$sig-$target.log"))"
  kill -"$sig" "$pid"
  wait "$pid"
  rc=$?
  [ "$rc" -eq "$status" ] || fail "$sig $target: exit status $rc, expected $status (128 + SIG$sig)"
  leftover=$(compgen -G "$out*" || true)
  [ -z "$leftover" ] || fail "$sig $target: left behind: $leftover"
  echo "SIG$sig during a $target quantization: status $rc, nothing left behind"
done
