"""A lab of Fan hosts in network namespaces: an underlay bridge, hosts on veths,
forwarders started in them, and cleanup that always runs. Names carry a caller's prefix.
Used by the demo, the data-path tests and the end-to-end benchmark."""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time

FANPKT = [sys.executable, "-m", "fanpkt"]
TRAFFIC = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                        "traffic.py")]
FORWARD = [sys.executable, "-c", "import sys; from fanpkt.cli import forward_main; "
           "sys.exit(forward_main())"]


def sh(*cmd, check=True, timeout=60, **kw):
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout,
                          **kw)


def nsx(ns, *cmd, **kw):
    return sh("ip", "netns", "exec", ns, *cmd, **kw)


class Lab:
    """An underlay 172.16.0.0/16: a switch namespace with a bridge, hosts on veths."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.switch = f"{prefix}sw"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.logs: dict[str, str] = {}
        self.ready_socks: dict[int, socket.socket] = {}     # pid: its notify socket
        self.ports = 0
        self._add_ns(self.switch)
        # The switch stands for an L2 switch: if br_netfilter is loaded on this machine,
        # keep it from running the IP hooks on every bridged frame (it is on by default in
        # a new namespace).
        for proto in ("arptables", "iptables", "ip6tables"):
            path = f"/proc/sys/net/bridge/bridge-nf-call-{proto}"
            nsx(self.switch, "sh", "-c", f"[ ! -e {path} ] || echo 0 > {path}")
        nsx(self.switch, "ip", "link", "add", "br0", "type", "bridge")
        nsx(self.switch, "ip", "link", "set", "br0", "up")
        nsx(self.switch, "ip", "link", "set", "lo", "up")

    def _add_ns(self, name):
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)

    def host(self, name: str, addr: str, mtu: int = 1500) -> str:
        ns = f"{self.prefix}{name}"
        self._add_ns(ns)
        self.plug(ns, addr, mtu)
        nsx(ns, "ip", "link", "set", "lo", "up")
        return ns

    def plug(self, ns: str, addr: str, mtu: int = 1500) -> None:
        """Give host ns an eth0 on the switch, holding addr/16 (again, after `ip link del
        eth0`: a replugged NIC, a new interface)."""
        self.ports += 1
        port = f"p{self.ports}"
        sh("ip", "link", "add", "eth0", "netns", ns, "mtu", str(mtu), "type", "veth",
           "peer", "name", port, "netns", self.switch, "mtu", str(mtu))
        nsx(self.switch, "ip", "link", "set", port, "master", "br0", "up")
        nsx(ns, "ip", "addr", "add", f"{addr}/16", "dev", "eth0")
        nsx(ns, "ip", "link", "set", "eth0", "up")

    def forward(self, ns: str, *args, wait=True, env=None, ready=None) -> subprocess.Popen:
        """Start fanpkt-forward in ns; env: variables to add to its environment. ready
        (default: wait) gives it a NOTIFY_SOCKET of the lab's, on which wait_ready hears
        its READY=1, sent once every fan is up; a test that passes its own NOTIFY_SOCKET
        hears it there instead."""
        log = f"/tmp/{ns}-fwd.log"        # kept for a failing test to show
        f = open(log, "w")
        env = dict(env or {})
        sock = None
        if (wait if ready is None else ready) and "NOTIFY_SOCKET" not in env:
            path = f"/tmp/{ns}-ready.{len(self.procs)}"
            if os.path.exists(path):
                os.unlink(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(path)
            env["NOTIFY_SOCKET"] = path
        p = subprocess.Popen(["ip", "netns", "exec", ns, *FORWARD, *args], stdout=f,
                             stderr=subprocess.STDOUT, env={**os.environ, **env})
        self.procs.append(p)
        self.logs[ns] = log
        if sock is not None:
            self.ready_socks[p.pid] = sock
        if wait:
            self.wait_ready(ns, p)
        return p

    def wait_ready(self, ns, p, timeout=20):
        """Until the forwarder says READY=1 (every fan up), if it was given the lab's
        notify socket; else until `fanpkt show` lists a fan. The socket is closed after:
        the forwarder logs once that it cannot notify, and nothing ever blocks on a full
        one."""
        deadline = time.monotonic() + timeout
        sock = self.ready_socks.pop(p.pid, None)
        try:
            while time.monotonic() < deadline:
                if p.poll() is not None:
                    raise AssertionError(f"forwarder in {ns} exited {p.returncode}: "
                                         f"{open(self.logs[ns]).read()}")
                if sock is not None:
                    if (select.select([sock], [], [], 0.1)[0]
                            and b"READY=1" in sock.recv(4096).split(b"\n")):
                        return
                    continue
                r = nsx(ns, *FANPKT, "show", check=False)
                if r.returncode == 0 and len(r.stdout.splitlines()) > 1:
                    return
                time.sleep(0.1)
        finally:
            if sock is not None:
                path = sock.getsockname()
                sock.close()
                os.unlink(path)
        raise AssertionError(f"forwarder in {ns} not ready: {open(self.logs[ns]).read()}")

    def stats(self, ns) -> dict:
        import json
        return json.loads(nsx(ns, *FANPKT, "stats", "--json").stdout)["total"]

    def stop(self, p: subprocess.Popen, sig=signal.SIGTERM, timeout=10) -> int:
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return p.returncode

    def container(self, host_ns: str, name: str, addr: str, gw: str, bridge: str = "fanbr",
                  plen: int = 24, mtu: int = 1480) -> str:
        """A namespace on a host's fan bridge, as Docker -b or LXD would attach one."""
        cns = f"{self.prefix}{name}"
        self._add_ns(cns)
        sh("ip", "link", "add", "eth0", "netns", cns, "mtu", str(mtu), "type", "veth",
           "peer", "name", f"v{name}", "netns", host_ns, "mtu", str(mtu))
        nsx(host_ns, "ip", "link", "set", f"v{name}", "master", bridge, "up")
        nsx(cns, "ip", "addr", "add", f"{addr}/{plen}", "dev", "eth0")
        nsx(cns, "ip", "link", "set", "eth0", "up")
        nsx(cns, "ip", "link", "set", "lo", "up")
        nsx(cns, "ip", "route", "add", "default", "via", gw)
        return cns

    def close(self):
        for p in self.procs:
            self.stop(p, timeout=5)
        for sock in self.ready_socks.values():     # never waited for
            path = sock.getsockname()
            sock.close()
            os.unlink(path)
        self.ready_socks.clear()
        for ns in reversed(self.namespaces):
            # whatever still runs in our namespaces was started by us (e.g. the dnsmasq of
            # a forwarder killed with -9)
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
            try:    # a forwarder killed with -9 leaves its state dir (keyed by netns inode)
                ino = os.stat(f"/run/netns/{ns}").st_ino
                shutil.rmtree(f"/run/fanpkt/net-{ino}", ignore_errors=True)
            except OSError:
                pass
            sh("ip", "netns", "del", ns, check=False)


# -- traffic and checks, run in a lab's namespaces -----------------------------------
def link_names(ns: str) -> set[str]:
    """Every link's name in ns."""
    return {link["ifname"] for link in json.loads(nsx(ns, "ip", "-j", "link").stdout)}


def bridge_ports(ns: str, bridge: str) -> set[str]:
    """The ports of a bridge in ns."""
    return {link["ifname"] for link in
            json.loads(nsx(ns, "ip", "-j", "link", "show", "master", bridge).stdout)}


def fan_port(ns: str, bridge: str, fan_device: str, udp_port: int = 8472) -> str:
    """A VXLAN fan's port on its bridge: its TAP (the userspace engine), or on the kernel
    path its UDP port's vxlan device (the port's first fan) or its veth end, fan-O."""
    ports = bridge_ports(ns, bridge) & {fan_device, f"fanvx-{udp_port}"}
    assert len(ports) == 1, (bridge, bridge_ports(ns, bridge))
    return ports.pop()


def ping(ns, dst, *args, count=3):
    return nsx(ns, "ping", "-n", "-c", str(count), "-i", "0.2", "-W", "2", *args, dst,
               check=False)


def start(ns, *args) -> subprocess.Popen:
    p = subprocess.Popen(["ip", "netns", "exec", ns, *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "listening", p.stderr.read()
    return p


def tcp_transfer(src_ns, dst_ns, dst_addr, nbytes, port=5001):
    sink = start(dst_ns, *TRAFFIC, "tcp-sink", str(port))
    try:
        sent = nsx(src_ns, *TRAFFIC, "tcp-send", dst_addr, str(port), str(nbytes),
                   timeout=300).stdout.split()
        got = sink.communicate(timeout=60)[0].split()
    finally:
        sink.kill()
    return sent, got


def udp_sizes(src_ns, dst_ns, dst_addr, largest, port=7007) -> list[str]:
    """Echo a UDP datagram of every size 1..largest (DF set) off dst_addr: the traffic
    script's "count smallest largest" of those that came back intact."""
    echo = start(dst_ns, *TRAFFIC, "udp-echo", str(port))
    try:
        return nsx(src_ns, *TRAFFIC, "udp-sizes", dst_addr, str(port), str(largest),
                   timeout=300).stdout.split()
    finally:
        echo.kill()


def bulk_checks(lab, h1, h2, dst_addr, overlay_mtu) -> dict:
    """64 MiB of TCP from h1 to dst_addr on h2 with matching SHA-256, UDP of every size up
    to what fits the overlay MTU, and counters that saw it all with no send or TUN/TAP
    write error. Returns h2's counters."""
    sent, got = tcp_transfer(h1, h2, dst_addr, 64 << 20)
    assert sent == got and int(got[0]) == 64 << 20
    largest = str(overlay_mtu - 28)                 # IPv4 and UDP headers
    assert udp_sizes(h1, h2, dst_addr, overlay_mtu - 28) == [largest, "1", largest]
    s1, s2 = lab.stats(h1), lab.stats(h2)
    assert s1["tx_packets"] > 45000 and s2["rx_packets"] > 45000, (s1, s2)
    assert s1["drop_tx_send_error"] == s2["drop_rx_tun_write"] == 0
    return s2


def dnsmasq_in(ns) -> list[str]:
    """The pids of the dnsmasq processes running in namespace ns."""
    return [p for p in sh("ip", "netns", "pids", ns).stdout.split()
            if sh("cat", f"/proc/{p}/comm", check=False).stdout.strip() == "dnsmasq"]


def poll(check, what, timeout=10, every=0.1):
    """Call check() until it returns something true, and return that; fail after timeout
    seconds saying `what` never happened."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"after {timeout} s: {what}"
        time.sleep(every)


DHCP_DISCOVER = """
from scapy.all import BOOTP, DHCP, IP, UDP, Ether, conf, get_if_hwaddr, mac2str, srp1
conf.checkIPaddr = False
mac = get_if_hwaddr("eth0")
ask = (Ether(dst="ff:ff:ff:ff:ff:ff", src=mac) / IP(src="0.0.0.0", dst="255.255.255.255") /
       UDP(sport=68, dport=67) / BOOTP(chaddr=mac2str(mac), xid=0x4242) /
       DHCP(options=[("message-type", "discover"), "end"]))
print("listening", flush=True)
# retry as DHCP clients do: the container's link may still be coming up
ans = srp1(ask, iface="eth0", timeout=3, retry=3, verbose=0)
if ans is None:
    print("no answer")
else:
    opts = {o[0]: o[1] for o in ans[DHCP].options if isinstance(o, tuple)}
    print(ans[BOOTP].yiaddr, opts.get("router"), opts.get("interface-mtu"),
          opts.get("subnet_mask"), opts.get("message-type"))
"""


def require_root():
    if os.geteuid() != 0:
        raise AssertionError("data-path tests need root (CI runs as root)")
