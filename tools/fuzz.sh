#!/usr/bin/env bash
# Long fuzzing runs (tests/fuzz.py): engine against oracle on every path of both fan
# types, and hostile text through the parsers, in rounds until the time is up.
#   tools/fuzz.sh [--seconds N] [--seed S] [--asan]
# --asan builds the core with AddressSanitizer (and the debug build's bounds checks) into
# build/asan/, leaving the in-place build alone, and runs Python with libasan preloaded.
# A failure prints the round's seed; --seed S (or FANPKT_FUZZ_SEED=S) replays it.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=60 seed="" asan=""
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    --asan) asan=1; shift ;;
    *) echo "usage: tools/fuzz.sh [--seconds N] [--seed S] [--asan]" >&2; exit 2 ;;
  esac
done
args=(--seconds "$seconds")
[ -n "$seed" ] && args+=(--seed "$seed")
if [ -z "$asan" ]; then
  exec env PYTHONPATH="$PWD" python3 tests/fuzz.py "${args[@]}"
fi
out=build/asan
log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "== building the core with AddressSanitizer into $out"
if ! FANPKT_ASAN=1 FANPKT_DEBUG=1 python3 setup.py build_ext --build-lib "$out" \
    --build-temp "$out/tmp" >"$log" 2>&1; then
  cat "$log" >&2
  exit 1
fi
cp fanpkt/*.py fanpkt/*.pyi fanpkt/py.typed "$out/fanpkt/"
libasan=$(gcc -print-file-name=libasan.so)
# detect_leaks=0: CPython's own allocations at exit are not ours to report
exec env PYTHONPATH="$PWD/$out" LD_PRELOAD="$libasan" \
  ASAN_OPTIONS="detect_leaks=0:abort_on_error=1" python3 tests/fuzz.py "${args[@]}"
