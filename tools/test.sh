#!/usr/bin/env bash
# Sets up (tools/setup.sh) and runs the whole test suite, on the release build and again
# on the FANPKT_DEBUG=1 build (bounds checks); before them, once, ruff, mypy and stubtest,
# the wheel's smoke test (tools/wheel-smoke.sh) and the kernel matrix:
# tests/test_kernel_compat.py on older kernels booted in qemu (tools/kernel_vm.py). Needs
# root: the data-path tests create network namespaces, TUN devices and raw sockets (as a
# normal user, run it with sudo; CONTRIBUTING.md says how to run the tests that need no
# root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
# a few seconds: style, types, and the compiled core against its stub
echo "== lint: ruff, mypy, stubtest of fanpkt/_fastpath.pyi"
python3 -m ruff check
python3 -m mypy
python3 -m mypy.stubtest fanpkt._fastpath --allowlist tools/stubtest-allowlist.txt
# first, so that the suite's own summary closes the output
echo "== the wheel: sdist and wheel built, the wheel smoke-tested in a clean venv"
bash tools/wheel-smoke.sh
for kernel in debian-6.1 debian-6.12; do
  echo "== kernel matrix: tests/test_kernel_compat.py on $kernel, in qemu"
  python3 tools/kernel_vm.py --kernel "$kernel" -- \
    python3 -m pytest -v -p no:cacheprovider tests/test_kernel_compat.py
done
echo "== tests, release build"
python3 -m pytest -q tests "$@"
echo "== soak, 2 minutes (bench/soak.py: traffic, reloads, flaps; fails on a leak, unbalanced counters or loss)"
soak_out=$(mktemp -d)
python3 bench/soak.py --minutes 2 --check --out "$soak_out"
rm -rf "$soak_out"
echo "== tests, FANPKT_DEBUG=1 build"
FANPKT_DEBUG=1 bash tools/setup.sh
python3 -m pytest -q tests "$@"
bash tools/setup.sh     # leave the release build installed
