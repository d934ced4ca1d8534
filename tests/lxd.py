"""Real LXD on fanpkt fans, shared by the LXD tests and the demo: one LXD daemon per fan
host, run inside the host's network namespace with a state directory (LXD_DIR) of its
own, as each host of a fan runs its own LXD. Debian's `lxd` package (5.0.2 on Debian 12),
started by hand: no systemd unit, no lxdbr0, no image server; an image built here from
the machine's static busybox and imported with `lxc image import`.

Why a daemon per namespace works: LXD creates its bridges, its dnsmasq, its nftables
table and the containers' veths in the namespace it runs in; its mounts go to the mount
namespace `ip netns exec` gives it, and its socket, database and storage pool (`dir`) to
its LXD_DIR. What two daemons share is the machine's: the cgroup tree, where LXC names
a container's cgroups after it (so container names carry the lab's prefix), and the
subordinate ids of /etc/subuid, which every daemon maps its containers' root to. One
daemon for two hosts would instead need a container's NIC moved to the other host's bridge
behind LXD's back (LXD plugs a veth's host end into a bridge of its own namespace): LXD
would list a network it does not serve. And a daemon in a namespace of ours keeps what it
tries at start (fetching instance types from images.linuxcontainers.org) off the network.

LXD's container monitors daemonise (their parent is PID 1 once lxd has forked them): the
daemon runs under a reaper of ours (a child subreaper), so that they are reaped and
waited for, and nothing of a daemon outlives close(). close() deletes the containers,
images, networks and storage pool through LXD, shuts the daemon down, and removes its
LXD_DIR and LXC's lock directory for it, also after a failure.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

from containers import INITTAB, RCS, UDHCPC_SCRIPT, remove_lock_dir
from lab import poll

# The daemon's parent: a child subreaper (PR_SET_CHILD_SUBREAPER = 36) that starts the
# command, forwards SIGTERM to it, reaps every orphan below it, and exits with the
# command's status once nothing below it is left.
REAPER = """
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
signal.signal(signal.SIGTERM, lambda *a: os.kill(pid, signal.SIGTERM))
rc = 0
while True:
    try:
        p, status = os.wait()
    except ChildProcessError:
        break
    if p == pid:
        rc = os.waitstatus_to_exitcode(status)
sys.exit(rc)
"""
# A storage pool and a default profile with a root disk: nothing else (no network, no
# HTTPS listener, no image updates from a server that is not there).
PRESEED = """config:
  images.auto_update_interval: "0"
storage_pools:
- name: default
  driver: dir
profiles:
- name: default
  devices:
    root:
      path: /
      pool: default
      type: disk
"""
IMAGE = "busybox"


def fan_network(slice_prefix: str, mtu: int = 1450) -> dict:
    """An LXD-managed bridge for a VXLAN fan, as docs/lxd.md gives it: the slice gateway
    with the overlay's prefix (/8 for a /8 overlay), DHCP only from this host's slice,
    the fan's MTU (sent to containers by LXD's dnsmasq), LXD's NAT (which leaves
    overlay-to-overlay alone), no IPv6."""
    return {"ipv4.address": f"{slice_prefix}.1/8", "ipv4.nat": "true",
            "ipv4.dhcp.ranges": f"{slice_prefix}.2-{slice_prefix}.254",
            "ipv6.address": "none", "bridge.mtu": str(mtu)}


def build_image(directory: str) -> tuple[str, str]:
    """A split LXD image (metadata tarball, rootfs tarball) holding the machine's static
    busybox and the same init as tests/containers.py: DHCP on eth0 by udhcpc, whose
    script applies address, router and MTU. Returns the two paths."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise AssertionError("busybox is missing: tools/setup.sh installs busybox-static")
    os.makedirs(directory, exist_ok=True)
    applets = subprocess.run([busybox, "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    rootfs = os.path.join(directory, "rootfs.tar")
    with tarfile.open(rootfs, "w") as tar:
        def add(name, kind=tarfile.DIRTYPE, data=b"", mode=0o755, target=""):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.linkname, info.size = kind, mode, target, len(data)
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data) if data else None)
        for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "etc/init.d", "dev",
                  "proc", "sys", "tmp", "run", "root", "var", "var/log", "srv"):
            add(d, mode=0o1777 if d == "tmp" else 0o755)
        with open(busybox, "rb") as f:
            add("bin/busybox", tarfile.REGTYPE, f.read())
        for applet in applets:
            if applet.strip("/") != "bin/busybox":
                add(applet.strip("/"), tarfile.SYMTYPE, target="/bin/busybox", mode=0o777)
        for name, text, mode in (("etc/inittab", INITTAB, 0o644),
                                 ("etc/init.d/rcS", RCS, 0o755),
                                 ("etc/udhcpc.script", UDHCPC_SCRIPT, 0o755),
                                 ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644),
                                 ("etc/group", "root:x:0:\n", 0o644)):
            add(name, tarfile.REGTYPE, text.encode(), mode)
    meta = os.path.join(directory, "meta.tar")
    yaml = (f"architecture: {os.uname().machine}\ncreation_date: {int(time.time())}\n"
            "properties:\n  description: busybox (fanpkt tests)\n  os: busybox\n")
    with tarfile.open(meta, "w") as tar:
        info = tarfile.TarInfo("metadata.yaml")
        info.size, info.mode, info.mtime = len(yaml), 0o644, int(time.time())
        tar.addfile(info, io.BytesIO(yaml.encode()))
    return meta, rootfs


class Lxd:
    """One LXD daemon in host namespace ns; its state lives under `directory`."""

    def __init__(self, ns: str, directory: str):
        if shutil.which("lxd") is None or shutil.which("lxc") is None:
            raise AssertionError("LXD is missing: tools/setup.sh installs it (apt lxd)")
        self.ns = ns
        self.dir = os.path.abspath(directory)
        self.lxd_dir = os.path.join(self.dir, "lxd")
        os.makedirs(self.lxd_dir, exist_ok=True)
        os.chmod(self.dir, 0o711)       # the unprivileged containers' root walks through it
        # LXD_CONF: the client's configuration stays here, not in root's home
        self.env = {**os.environ, "LXD_DIR": self.lxd_dir,
                    "LXD_CONF": os.path.join(self.dir, "client")}
        self.log = os.path.join(self.dir, "lxd.log")
        self.containers: list[str] = []
        self.images: list[str] = []
        self.networks: list[str] = []
        self.closed = False
        out = open(os.path.join(self.dir, "lxd.out"), "w")
        self.daemon = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", REAPER, "lxd", "--group",
             "lxd", "--logfile", self.log], env=self.env, stdin=subprocess.DEVNULL,
            stdout=out, stderr=subprocess.STDOUT)
        out.close()
        try:
            r = self._run("lxd", "waitready", "--timeout", "60", timeout=90)
            assert r.returncode == 0, f"lxd in {ns} did not start: {self.logs()}"
            r = self._run("lxd", "init", "--preseed", input=PRESEED)
            assert r.returncode == 0, f"lxd init: {r.stdout}{r.stderr}"
        except BaseException:
            self.close()
            raise

    def _run(self, *cmd, timeout=120, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True,
                              timeout=timeout, **kw)

    def lxc(self, *args, check=True, timeout=120) -> subprocess.CompletedProcess:
        """An `lxc` command against this daemon; a failure says what LXD said."""
        r = self._run("lxc", *args, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"lxc {' '.join(args)} (in {self.ns}): exit "
                                 f"{r.returncode}: {r.stdout}{r.stderr}")
        return r

    def logs(self) -> str:
        out = []
        for name in ("lxd.out", "lxd.log"):
            try:
                with open(os.path.join(self.dir, name)) as f:
                    out.append(f.read()[-4000:])
            except OSError:
                pass
        return "\n".join(out)

    def import_image(self, meta: str, rootfs: str, alias: str = IMAGE) -> None:
        self.lxc("image", "import", meta, rootfs, "--alias", alias)
        self.images.append(alias)

    def create_network(self, name: str, config: dict) -> None:
        self.lxc("network", "create", name, *(f"{k}={v}" for k, v in config.items()))
        self.networks.append(name)

    def launch(self, name: str, network: str, image: str = IMAGE) -> None:
        """A container whose eth0 is on LXD network `network`."""
        self.containers.append(name)
        self.lxc("launch", image, name, "--network", network)

    def address(self, name: str, timeout: float = 30) -> str:
        """eth0's IPv4 address once the container's DHCP client has applied a lease
        (what `lxc list` shows)."""
        def bound():
            state = json.loads(self.lxc("query", f"/1.0/instances/{name}/state").stdout)
            eth0 = (state.get("network") or {}).get("eth0") or {}
            return next((a["address"] for a in eth0.get("addresses", [])
                         if a["family"] == "inet"), None)
        return poll(bound, f"container {name} got no DHCP lease:\n"
                    f"{self.exec(name, 'cat', '/var/log/udhcpc', check=False).stdout}",
                    timeout, every=0.3)

    def exec(self, name: str, *cmd, check=True, timeout=120) -> subprocess.CompletedProcess:
        return self.lxc("exec", name, "--", *cmd, check=check, timeout=timeout)

    def list(self) -> str:
        return self.lxc("list", "-c", "ns4t").stdout

    def serve(self, name: str, nbytes: int) -> str:
        """Serve nbytes of random data over HTTP (busybox httpd, port 80) from the
        container; returns its SHA-256."""
        return self.exec(name, "sh", "-c", f"head -c {nbytes} /dev/urandom > /srv/blob && "
                         "httpd -p 80 -h /srv && sha256sum /srv/blob").stdout.split()[0]

    def fetch(self, name: str, url: str, timeout: float = 120) -> tuple[int, str]:
        """Fetch url into the container; (bytes, SHA-256)."""
        r = self.exec(name, "sh", "-c", f"wget -q -O /tmp/blob {url} && wc -c < /tmp/blob "
                      "&& sha256sum /tmp/blob && rm /tmp/blob", timeout=timeout)
        size, digest = r.stdout.split()[:2]
        return int(size), digest

    def close(self) -> list[str]:
        """Delete what this daemon made (containers, images, networks, the pool), stop
        it, remove its state; returns what LXD refused along the way (empty if it all
        went as it should). Runs to the end whatever fails."""
        if self.closed:
            return []
        self.closed = True
        problems = []
        if self.daemon.poll() is None:
            steps = ([("delete", "--force", c) for c in self.containers]
                     + [("image", "delete", i) for i in self.images]
                     + [("network", "delete", n) for n in self.networks]
                     + [("profile", "device", "remove", "default", "root"),
                        ("storage", "delete", "default")])
            for step in steps:
                try:
                    r = self.lxc(*step, check=False, timeout=60)
                except subprocess.TimeoutExpired:
                    problems.append(f"lxc {' '.join(step)}: timed out")
                    continue
                # a step whose object was never made (a failed launch) is no problem
                if r.returncode and "not found" not in r.stderr.lower():
                    problems.append(f"lxc {' '.join(step)}: {r.stderr.strip()}")
            try:
                self._run("lxd", "shutdown", "--timeout", "30", timeout=60)
            except subprocess.TimeoutExpired:
                problems.append("lxd shutdown: timed out")
        try:
            self.daemon.wait(30)
        except subprocess.TimeoutExpired:
            problems.append("lxd did not stop: killed")
            self._kill_tree(self.daemon.pid)
            self.daemon.wait()
        if self.daemon.returncode:
            problems.append(f"lxd exited {self.daemon.returncode}")
        # LXD keeps nothing mounted in this mount namespace (its mounts are in the one
        # `ip netns exec` made, gone with the daemon); a leftover would make rmtree fail
        with open("/proc/self/mounts") as f:
            mounts = [ln.split()[1] for ln in f if ln.split()[1].startswith(self.dir + "/")]
        for m in reversed(mounts):
            problems.append(f"{m} was still mounted")
            subprocess.run(["umount", "-l", m], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        remove_lock_dir(os.path.join(self.lxd_dir, "containers"))
        return problems

    @staticmethod
    def _kill_tree(pid: int) -> None:
        """SIGKILL pid and everything below it (the reaper's subtree)."""
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
        todo = [pid]
        while todo:
            p = todo.pop()
            todo += children.get(p, [])
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
