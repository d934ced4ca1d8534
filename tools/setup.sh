#!/usr/bin/env bash
# Installs what fanpkt needs on a fresh Debian/Ubuntu machine and builds it in place.
# Idempotent. FANPKT_DEBUG=1 builds the debug variant (bounds checks, -O0 -g).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then echo "tools/setup.sh: run as root (apt-get, netns)" >&2; exit 3; fi
missing=""
# qemu, static busybox, cpio and static libc: the ufan-peer interop tests boot a real
# Ubuntu fan kernel with them; lxc (its busybox template, from that static busybox): the
# container tests and the demo; kmod (depmod, modprobe): the kernel matrix's guests
# (tools/kernel_vm.py) load their kernel's modules with it
for cmd in ip nft iperf3 ping ethtool dnsmasq gcc qemu-system-x86_64 busybox cpio lxc-start \
    depmod clang; do
  command -v "$cmd" >/dev/null || missing=1
done
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || missing=1
# clang and libbpf's headers: the kernel data path's eBPF object (_fast/fan_vxlan.bpf.c)
[ -f /usr/include/bpf/bpf_helpers.h ] || missing=1
# LXD, Debian's package (on Ubuntu, apt's `lxd` is only a way to the snap): the LXD tests
# and the demo's `--runtime lxd`
debian=""
if grep -qx 'ID=debian' /etc/os-release 2>/dev/null; then
  debian=1
  command -v lxd >/dev/null || missing=1
fi
# a venv with pip (Debian's python3 needs python3-venv): the wheel's smoke test
python3 -c "import ensurepip, venv" 2>/dev/null || missing=1
if [ -n "$missing" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq iproute2 nftables iperf3 iputils-ping ethtool dnsmasq-base procps gcc python3-dev \
    libc6-dev qemu-system-x86 busybox-static cpio python3-venv kmod clang libbpf-dev >/dev/null
  # without lxcfs, AppArmor and the download template's tools: nothing the busybox
  # template needs
  apt-get install -y -qq --no-install-recommends lxc >/dev/null
  # without AppArmor and lxd-agent (VMs): containers need neither. No daemon starts here:
  # the tests run their own, each with its own LXD_DIR (tests/lxd.py)
  if [ -n "$debian" ]; then
    apt-get install -y -qq --no-install-recommends lxd >/dev/null
    # under systemd, the package starts a system-wide daemon: nothing here uses it
    if [ -d /run/systemd/system ]; then
      systemctl disable --now lxd.socket lxd.service lxd-containers.service >/dev/null 2>&1 || true
    fi
  fi
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# pip's build chatter goes to a log that is shown only when something fails
if ! { python3 -m pip install -q --upgrade pip && python3 -m pip install -q -e '.[test,bench]'; } \
    >"$log" 2>&1; then
  cat "$log" >&2
  echo "tools/setup.sh: pip install failed (log above)" >&2
  exit 1
fi
# one line, exit 8, if the compiled core did not build
python3 -c "import sys; from fanpkt.errors import BuildError
try: import fanpkt.engine
except BuildError as e: sys.exit(f'tools/setup.sh: {e}')"
