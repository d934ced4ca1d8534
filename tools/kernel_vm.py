#!/usr/bin/env python3
"""Runs one command as root under another kernel: a distribution's stock kernel package,
booted in qemu (TCG: no KVM needed), with this machine's root file system as the guest's
(shared read-only over virtio-9p, a tmpfs overlay on top for writes). The guest thus runs
the same Python, the same checkout and the same tools as the host, only on the other
kernel: the kernel matrix of tools/test.sh.

    python3 tools/kernel_vm.py --kernel debian-6.1 -- python3 -m pytest tests/test_x.py

The kernel package is fetched from the machine's apt sources once and unpacked under
CACHE. The guest gets no network device: its tests build their hosts in network
namespaces, as on the host. Exit status: the command's; 124 if the guest did not finish
in time; 125 if the guest could not be set up.
"""
from __future__ import annotations

import argparse
import gzip
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

CACHE = "/var/cache/fanpkt/kernels"
# name -> the apt package pattern; the newest package matching is taken
KERNELS = {
    "debian-6.1": r"linux-image-6\.1\.0-[0-9]+-amd64",     # Debian 12's own kernel
    "debian-6.12": r"linux-image-6\.12\.[0-9]+\+deb12-amd64",  # Debian 12's backport
}
# what the initramfs loads to reach the shared root (with what they depend on)
BOOT_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay"]
RC_MARK = "FANPKT-VM-RC="

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.load); do insmod "/modules/$m" || echo "kernel_vm: insmod $m failed"; done
mkdir -p /lower /upper /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot /lower \\
  || { echo "{mark}125"; poweroff -f; }
mount -t tmpfs -o size=2G tmpfs /upper
mkdir -p /upper/u /upper/w
mount -t overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w overlay /newroot
cp /job.sh /newroot/kernel-vm-job.sh
for d in proc sys dev; do mount --move /$d /newroot/$d; done
exec switch_root /newroot /bin/sh /kernel-vm-job.sh
"""

# Runs in the guest's real root (the overlay). The module tree of the guest's kernel is
# put where modprobe (and the kernel's own module requests) look for it. /run is the
# guest's own (network namespaces, fanpkt's state); /tmp stays the host's, under the
# overlay, since the checkout may live there.
JOB = """set -u
mount -t tmpfs tmpfs /run
mkdir -p /run/netns /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
mkdir -p /lib/modules/{release}
mount --bind {moddir} /lib/modules/{release}
depmod -a {release}
echo /sbin/modprobe > /proc/sys/kernel/modprobe
modprobe -a tun veth bridge
ip link set lo up
hostname kernel-vm
export HOME=/root PATH={path} CI="${{CI:-}}" {env}
cd {cwd} || {{ echo "{mark}125"; poweroff -f; }}
echo "kernel_vm: running on $(uname -r): {cmd_text}"
{cmd}
rc=$?
echo "{mark}$rc"
sync
poweroff -f
"""


def sh(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


def newest_package(pattern: str) -> str:
    """The newest package of the apt sources whose name matches pattern in full."""
    def search() -> list[str]:
        out = sh("apt-cache", "search", "--names-only", f"^{pattern}$").stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]
    names = search()
    if not names:
        sh("apt-get", "update", "-qq")
        names = search()
    if not names:
        raise SystemExit(f"kernel_vm: no package matches {pattern} in the apt sources")
    return max(names, key=lambda n: [int(x) for x in re.findall(r"\d+", n)])


def fetch(package: str) -> str:
    """The package unpacked under CACHE (downloaded once): its directory."""
    root = os.path.join(CACHE, package)
    if os.path.isdir(os.path.join(root, "boot")):
        return root
    os.makedirs(CACHE, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        # apt's sandbox user cannot write into a root-owned temporary directory
        os.chmod(tmp, 0o755)
        sh("apt-get", "download", "-q", package, cwd=tmp)
        deb = next(f for f in os.listdir(tmp) if f.endswith(".deb"))
        unpacked = os.path.join(tmp, "root")
        sh("dpkg-deb", "-x", os.path.join(tmp, deb), unpacked)
        os.rename(unpacked, root)
    return root


def module_index(moddir: str) -> dict[str, str]:
    """Module name (dashes as underscores) -> its .ko (or .ko.xz) path under moddir."""
    index = {}
    for dirpath, _, files in os.walk(moddir):
        for f in files:
            m = re.fullmatch(r"(.+)\.ko(\.xz)?", f)
            if m:
                index[m.group(1).replace("-", "_")] = os.path.join(dirpath, f)
    return index


def module_bytes(path: str) -> bytes:
    """A module's ELF image (busybox's insmod takes no compressed one)."""
    with open(path, "rb") as f:
        data = f.read()
    return lzma.decompress(data) if path.endswith(".xz") else data


def depends(path: str) -> list[str]:
    """The modules a .ko needs loaded first (its .modinfo `depends=`)."""
    m = re.search(rb"\0depends=([^\0]*)\0", module_bytes(path))
    return [d.decode().replace("-", "_") for d in m.group(1).split(b",") if d] if m else []


def load_order(index: dict[str, str], wanted: list[str]) -> list[str]:
    """wanted and what they depend on, each after its dependencies. A name with no .ko is
    built into the kernel."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order or name not in index:
            return
        for dep in depends(index[name]):
            visit(dep)
        order.append(name)
    for name in wanted:
        visit(name)
    return order


def initramfs(kroot: str, release: str, job: str, out: str) -> None:
    """A gzipped cpio with static busybox, the boot modules, /init and the job."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise SystemExit("kernel_vm: busybox not found (apt-get install busybox-static)")
    index = module_index(os.path.join(kroot, "lib/modules", release))
    with tempfile.TemporaryDirectory() as d:
        for sub in ("bin", "modules", "proc", "sys", "dev"):
            os.makedirs(os.path.join(d, sub))
        shutil.copy(busybox, os.path.join(d, "bin/busybox"))
        order = load_order(index, BOOT_MODULES)
        for name in order:
            with open(os.path.join(d, "modules", name + ".ko"), "wb") as f:
                f.write(module_bytes(index[name]))
        with open(os.path.join(d, "modules.load"), "w") as f:
            f.write("".join(f"{name}.ko\n" for name in order))
        with open(os.path.join(d, "init"), "w") as f:
            f.write(INIT.replace("{mark}", RC_MARK))
        os.chmod(os.path.join(d, "init"), 0o755)
        with open(os.path.join(d, "job.sh"), "w") as f:
            f.write(job)
        files = sh("find", ".", cwd=d).stdout
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=d, input=files.encode(),
                              capture_output=True, check=True).stdout
    with gzip.open(out, "wb", compresslevel=1) as f:
        f.write(cpio)


def run(kernel: str, cmd: list[str], timeout: float, memory: int, cpus: int,
        env: dict[str, str]) -> int:
    package = newest_package(KERNELS[kernel])
    kroot = fetch(package)
    vmlinuz = next(os.path.join(kroot, "boot", f) for f in os.listdir(os.path.join(kroot, "boot"))
                   if f.startswith("vmlinuz-"))
    release = os.path.basename(vmlinuz)[len("vmlinuz-"):]
    moddir = os.path.join(kroot, "lib/modules", release)
    job = JOB.format(release=release, moddir=shlex.quote(moddir),
                     path=shlex.quote(os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")),
                     env=" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()),
                     cwd=shlex.quote(os.getcwd()), cmd=shlex.join(cmd),
                     cmd_text=shlex.join(cmd).replace('"', "'"), mark=RC_MARK)
    with tempfile.TemporaryDirectory() as d:
        initrd = os.path.join(d, "initrd.gz")
        initramfs(kroot, release, job, initrd)
        qemu = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max",
                "-m", str(memory), "-smp", str(cpus), "-kernel", vmlinuz, "-initrd", initrd,
                "-append", "console=ttyS0 panic=-1 quiet loglevel=3",
                "-nographic", "-no-reboot", "-nic", "none",
                "-virtfs", "local,path=/,mount_tag=hostroot,security_model=passthrough,"
                           "readonly=on,multidevs=remap"]
        print(f"kernel_vm: booting {package} ({release}) in qemu", flush=True)
        started = time.monotonic()
        p = subprocess.Popen(qemu, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
        rc = None
        try:
            assert p.stdout is not None
            for raw in p.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n")
                print(line, flush=True)
                if line.startswith(RC_MARK) and line[len(RC_MARK):].strip().isdigit():
                    rc = int(line[len(RC_MARK):].strip())
                if time.monotonic() - started > timeout:
                    print(f"kernel_vm: no result after {timeout:.0f} s", flush=True)
                    break
        finally:
            if p.poll() is None:
                p.kill()
            p.wait()
        print(f"kernel_vm: {release} done in {time.monotonic() - started:.0f} s, "
              f"exit status {rc}", flush=True)
        return 124 if rc is None else rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", choices=sorted(KERNELS), default="debian-6.1")
    ap.add_argument("--timeout", type=float, default=900, help="seconds (default 900)")
    ap.add_argument("--memory", type=int, default=2048, help="MiB (default 2048)")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="set in the guest command's environment")
    ap.add_argument("cmd", nargs="+", help="the command, after --")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("kernel_vm: run as root (apt, qemu's 9p passthrough)", file=sys.stderr)
        return 125
    env = dict(kv.split("=", 1) for kv in a.env)
    return run(a.kernel, a.cmd, a.timeout, a.memory, a.cpus, env)


if __name__ == "__main__":
    sys.exit(main())
