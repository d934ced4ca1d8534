"""The `dhcp` flag (docs/internals.md §5): a dnsmasq per fan bridge, serving slice.(K+1) up to the
slice's last address before broadcast (slice.254 for a /24; K = host-reserve), with the
slice gateway as router and the overlay MTU, and no DNS.

fanpkt starts dnsmasq as a child and ends it by PID when the fan goes down. Its PID and
pid file are in the fan's plumbing record, so a crashed run's dnsmasq is ended by the next
start; the pid file's path in the process's command line tells it from an unrelated
process that got the same PID later. Leases live in the run directory and go with the
fan: after a restart dnsmasq answers renewals authoritatively and pings an address before
it offers it, so an address still in use is not handed out twice.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass

from .config import FanSpec
from .errors import FanError
from .fanmap import ip, mask

log = logging.getLogger("fanpkt")
LEASE_TIME = "12h"
READY_TIMEOUT = 5.0         # seconds dnsmasq may take to bind its DHCP socket


@dataclass
class Dnsmasq:
    """A running dnsmasq, as the fan's plumbing record keeps it."""
    pid: int
    pid_file: str
    lease_file: str

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Dnsmasq":
        return cls(int(d["pid"]), str(d["pid_file"]), str(d["lease_file"]))


def pool(spec: FanSpec) -> tuple[int, int]:
    """First and last address dnsmasq may hand out: the slice's container addresses."""
    return spec.map.usable_range(spec.map.host)


def command(spec: FanSpec, overlay_mtu: int, run_dir: str) -> list[str]:
    m, (first, last) = spec.map, pool(spec)
    base = os.path.join(os.path.abspath(run_dir), f"dhcp-{spec.bridge_name}")
    # VXLAN (LXD's layout): the whole overlay is on-link; IPIP: the slice is
    netmask = mask(m.overlay_len if spec.vxlan else m.slice_len)
    return ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
            "--log-facility=-", "--quiet-dhcp",
            f"--interface={spec.bridge_name}", "--bind-dynamic", "--except-interface=lo",
            f"--dhcp-range={ip(first)},{ip(last)},{ip(netmask)},{LEASE_TIME}",
            f"--dhcp-option=option:router,{ip(m.gateway)}",
            # forced: sent even to clients that do not ask for it (busybox udhcpc, many
            # others), as LXD's dnsmasq does; otherwise they stay at 1500 and black-hole
            f"--dhcp-option-force=option:mtu,{overlay_mtu}",
            "--dhcp-authoritative",
            f"--dhcp-leasefile={base}.leases", f"--pid-file={base}.pid"]


def start(spec: FanSpec, overlay_mtu: int, run_dir: str) -> Dnsmasq:
    """Start the bridge's dnsmasq; returns the record stop() needs."""
    if shutil.which("dnsmasq") is None:
        raise FanError("the dhcp flag needs dnsmasq (`apt-get install dnsmasq-base`)")
    cmd = command(spec, overlay_mtu, run_dir)
    pid_file, lease_file = cmd[-1].split("=", 1)[1], cmd[-2].split("=", 1)[1]
    try:
        os.unlink(pid_file)
    except FileNotFoundError:
        pass
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    rec = Dnsmasq(p.pid, pid_file, lease_file)
    # dnsmasq writes its pid file once its DHCP socket is bound: until then a DISCOVER
    # would go unanswered, so the fan is not reported up before it. A bad option or a
    # busy port ends it instead.
    deadline = time.monotonic() + READY_TIMEOUT
    while not os.path.exists(rec.pid_file):
        if p.poll() is not None or time.monotonic() > deadline:
            stop(rec)
            why = (f"exited with status {p.returncode} (its message is above)"
                   if p.returncode is not None else
                   f"was not serving after {READY_TIMEOUT:.0f} s")
            raise FanError(f"dnsmasq for bridge {spec.bridge_name} {why}")
        time.sleep(0.02)
    first, last = pool(spec)
    log.info("%s: dhcp on %s, %s - %s, leases in %s", spec.map.overlay_net, spec.bridge_name,
             ip(first), ip(last), rec.lease_file)
    return rec


def _ours(pid: int, pid_file: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f"--pid-file={pid_file}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def _gone(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid        # our child: reaped
    except ChildProcessError:
        return not os.path.exists(f"/proc/{pid}")           # a crashed run's


def stop(rec: Dnsmasq) -> None:
    """End the dnsmasq of a record (this run's or a crashed one's) and remove its files."""
    pid = rec.pid
    if pid and _ours(pid, rec.pid_file):
        try:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 2
            while not _gone(pid):
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    deadline += 2
                time.sleep(0.02)
        except PermissionError:     # it runs as 'nobody': ending it takes CAP_KILL
            log.error("cannot end dnsmasq (pid %d): no CAP_KILL; end it by hand", pid)
            return
    elif pid:
        _gone(pid)              # exited by itself: reap it if it was our child
    for path in (rec.pid_file, rec.lease_file):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
