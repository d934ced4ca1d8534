"""Real LXC containers on a lab host's fan bridge, shared by the container tests and the
demo. Debian's `lxc` with its busybox template (no download: the rootfs is this machine's
static busybox), privileged, one veth per container whose host end `lxc-start` plugs into
the fan bridge. Every LXC command runs inside the host's network namespace: lxc-start
creates the veth where it runs, and the monitor's command socket is an abstract unix
socket, which only that namespace can reach.

The container boots busybox init, which runs only our rcS: a DHCP client (udhcpc) that
asks for the MTU (option 26) as well as address and router, and a script that applies all
three, as a distribution's client does. Everything lives in one lxcpath (a directory the
caller owns); close() kills every container, waits for its monitor and removes the
lxcpath and LXC's lock directory for it, so nothing stays behind.
"""
from __future__ import annotations

import os
import shutil
import subprocess

from lab import nsx, poll

# udhcpc runs this at each lease event ($1) with the lease in the environment. The MTU
# first: with the address comes the default route, and traffic with it.
UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
  deconfig) ip addr flush dev "$interface" ;;
  bound|renew)
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    ;;
esac
exit 0
"""
# -f: stay in the foreground (rcS puts it in the background and it renews the lease);
# retry every second. No -O mtu: a stock client does not ask for the MTU, and fanpkt's
# dnsmasq sends it all the same (as LXD's does).
RCS = """#!/bin/sh
mount -a
ip link set lo up
udhcpc -f -i eth0 -t 5 -T 1 -A 1 -s /etc/udhcpc.script >/var/log/udhcpc 2>&1 &
"""
# No getty and no console shell: nothing to respawn, nothing reading the console.
INITTAB = "::sysinit:/etc/init.d/rcS\n"
LOCK_ROOT = "/run/lxc/lock"
ENV = ["--clear-env", "-v", "PATH=/bin:/sbin:/usr/bin:/usr/sbin"]


def remove_lock_dir(lxcpath: str) -> None:
    """LXC keeps a lock directory per lxcpath, /run/lxc/lock/<lxcpath>: remove it and the
    parents it made for it, as far as they are empty."""
    lock = LOCK_ROOT + os.path.abspath(lxcpath)
    shutil.rmtree(lock, ignore_errors=True)
    parent = os.path.dirname(lock)
    while parent != LOCK_ROOT:
        try:
            os.rmdir(parent)
        except OSError:
            break       # it holds something else
        parent = os.path.dirname(parent)


class Lxc:
    """Containers in one lxcpath; each belongs to a host namespace of a Lab."""

    def __init__(self, lxcpath: str):
        if shutil.which("lxc-start") is None:
            raise AssertionError("LXC is missing: tools/setup.sh installs it (apt lxc)")
        self.path = os.path.abspath(lxcpath)
        os.makedirs(self.path, exist_ok=True)
        self.hosts: dict[str, str] = {}            # container -> its host namespace
        self.monitors: dict[str, subprocess.Popen] = {}
        self.inits: dict[str, int] = {}

    def _lxc(self, name: str, tool: str, *args, **kw):
        return nsx(self.hosts[name], tool, "-P", self.path, "-n", name, *args, **kw)

    def start(self, host_ns: str, name: str, bridge: str, mtu: int = 1500) -> str:
        """Create and boot container `name` with eth0 on `bridge` of host_ns. Its link
        starts at `mtu` (1500 unless told): the fan's MTU must come from DHCP."""
        self.hosts[name] = host_ns
        conf = os.path.join(self.path, f"{name}.conf")
        with open(conf, "w") as f:
            f.write("lxc.net.0.type = veth\n"
                    f"lxc.net.0.link = {bridge}\n"
                    "lxc.net.0.name = eth0\n"
                    "lxc.net.0.flags = up\n"
                    # without it, LXC copies the bridge's MTU to the veth
                    f"lxc.net.0.mtu = {mtu}\n"
                    # no AppArmor profile to generate (and none loaded where it is absent)
                    "lxc.apparmor.profile = unconfined\n")
        self._lxc(name, "lxc-create", "-t", "busybox", "-f", conf, timeout=120)
        rootfs = os.path.join(self.path, name, "rootfs")
        for rel, text, mode in (("etc/inittab", INITTAB, 0o644),
                                ("etc/init.d/rcS", RCS, 0o755),
                                ("etc/udhcpc.script", UDHCPC_SCRIPT, 0o755)):
            with open(os.path.join(rootfs, rel), "w") as f:
                f.write(text)
            os.chmod(os.path.join(rootfs, rel), mode)
        log = open(os.path.join(self.path, f"{name}.console"), "w")
        # -F: the monitor stays our child, so close() can wait for it (a daemonised one
        # would be left to PID 1 to reap)
        self.monitors[name] = subprocess.Popen(
            ["ip", "netns", "exec", host_ns, "lxc-start", "-F", "-P", self.path, "-n", name,
             "-o", os.path.join(self.path, f"{name}.log"), "-l", "INFO"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        r = self._lxc(name, "lxc-wait", "-s", "RUNNING", "-t", "30", check=False, timeout=40)
        assert r.returncode == 0, f"container {name} did not start: {self.log(name)}"
        self.inits[name] = int(self._lxc(name, "lxc-info", "-p", "-H").stdout)
        return name

    def log(self, name: str) -> str:
        out = []
        for suffix in (".log", ".console"):
            try:
                with open(os.path.join(self.path, name + suffix)) as f:
                    out.append(f.read()[-4000:])
            except OSError:
                pass
        return "\n".join(out)

    def run(self, name: str, *cmd, **kw) -> subprocess.CompletedProcess:
        """Run cmd inside the container (lxc-attach), as the tests' nsx runs in a netns."""
        return self._lxc(name, "lxc-attach", *ENV, "--", *cmd, **kw)

    def lease(self, name: str, timeout: float = 30) -> dict:
        """Wait for eth0's DHCP lease to be applied; returns address, prefix length,
        router, MTU and MAC as the container sees them."""
        def bound():
            r = self.run(name, "sh", "-c", "ip -4 -o addr show dev eth0; ip -4 route; "
                         "cat /sys/class/net/eth0/mtu /sys/class/net/eth0/address",
                         check=False)
            if r.returncode != 0 or "inet " not in r.stdout or "default" not in r.stdout:
                return None
            return r.stdout
        out = poll(bound, f"container {name} got no DHCP lease:\n{self.log(name)}\n"
                   f"{self.run(name, 'cat', '/var/log/udhcpc', check=False).stdout}",
                   timeout, every=0.3)
        lines = out.split("\n")
        addr, plen = lines[0].split(" inet ")[1].split()[0].split("/")
        router = next(ln.split()[2] for ln in lines if ln.startswith("default via"))
        mtu, mac = [ln for ln in lines if ln.strip()][-2:]
        return {"addr": addr, "plen": int(plen), "router": router, "mtu": int(mtu),
                "mac": mac.strip()}

    def host_veth(self, name: str) -> str:
        """The host end of the container's veth, in its host namespace."""
        return self._lxc(name, "lxc-info", "-H").stdout.split("Link:")[1].split()[0]

    def serve(self, name: str, nbytes: int) -> str:
        """Serve nbytes of random data over HTTP (busybox httpd on port 80) from the
        container; returns its SHA-256."""
        script = (f"mkdir -p /srv && head -c {nbytes} /dev/urandom > /srv/blob && "
                  "httpd -p 80 -h /srv && sha256sum /srv/blob")
        return self.run(name, "sh", "-c", script).stdout.split()[0]

    def fetch(self, name: str, addr: str, timeout: float = 120) -> tuple[int, str]:
        """Fetch the blob another container serves at addr over TCP; (bytes, SHA-256)."""
        r = self.run(name, "sh", "-c", f"wget -q -O /dev/shm/blob http://{addr}/blob && "
                     "wc -c < /dev/shm/blob && sha256sum /dev/shm/blob && rm /dev/shm/blob",
                     timeout=timeout)
        size, digest = r.stdout.split()[:2]
        return int(size), digest

    def close(self) -> None:
        """Stop and destroy every container; leaves no process, veth, file or lock."""
        for name, mon in self.monitors.items():
            self._lxc(name, "lxc-stop", "-k", check=False, timeout=30)
            try:
                mon.wait(10)
            except subprocess.TimeoutExpired:
                # a monitor that will not stop: its container's init goes with SIGKILL
                # (the PID namespace ends with its init), then the monitor itself
                try:
                    os.kill(self.inits.get(name, 0) or mon.pid, 9)
                except OSError:
                    pass
                mon.kill()
                mon.wait()
        for name in self.hosts:
            if os.path.isdir(os.path.join(self.path, name)):
                self._lxc(name, "lxc-destroy", check=False, timeout=60)
        shutil.rmtree(self.path, ignore_errors=True)
        remove_lock_dir(self.path)
        self.hosts.clear()
        self.monitors.clear()

