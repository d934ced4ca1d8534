"""The kernel data path of VXLAN fans (fanpkt/kernelpath.py, _fast/fan_vxlan.bpf.c): a
stock flow-based vxlan device steered by two tc programs. Hosts in namespaces, each fan set
up by tests/kernel_host.py; with each other, with fanpkt's userspace VXLAN, on the wire
(scapy), and against hostile datagrams, each dropped and counted by its reason."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from lab import nsx, ping, tcp_transfer

from fanpkt.kernelpath import KERNEL_COUNTERS

HERE = os.path.dirname(os.path.abspath(__file__))
VXLAN = ["-o", "241.0.0.0/8", "--type", "vxlan"]


def test_the_counter_names_are_the_programs_order():
    """KERNEL_COUNTERS names enum kcounter of the C source, entry for entry."""
    src = open(os.path.join(HERE, "..", "_fast", "fan_vxlan.bpf.c")).read()
    body = re.search(r"enum kcounter \{(.*?)\};", src, re.S).group(1)
    names = [n.strip().lower() for n in body.split(",") if n.strip()]
    assert names[-1] == "n_kcounters"
    assert names[:-1] == KERNEL_COUNTERS


class KernelHost:
    """tests/kernel_host.py running in a namespace: the fan is up while it runs."""

    def __init__(self, ns: str, addr: str, *flags: str):
        self.p = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, os.path.join(HERE, "kernel_host.py"),
             "241.0.0.0/8", f"{addr}/16", *flags], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            # this checkout's fanpkt, whatever is installed
            env={**os.environ, "PYTHONPATH": os.path.dirname(HERE)})
        line = self.p.stdout.readline().strip()
        assert line == "ready", self.p.stderr.read()

    def counters(self) -> dict:
        self.p.stdin.write("\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.stdin.close()
            self.p.wait(timeout=30)


@pytest.fixture
def kernel_hosts(lab):
    """Hosts whose fans run on the kernel path, taken down after the test."""
    made: list[KernelHost] = []

    def make(name: str, addr: str, *flags: str) -> tuple[str, KernelHost]:
        ns = lab.host(name, addr)
        # a veth's checksum offload would leave the inner TCP checksum partial in the
        # datagram, as no NIC does: a userspace peer reads datagrams as the wire has them
        nsx(ns, "ethtool", "-K", "eth0", "tx", "off")
        made.append(KernelHost(ns, addr, *flags))
        return ns, made[-1]
    yield make
    for k in made:
        k.close()


def links(ns) -> list[str]:
    return [link["ifname"] for link in json.loads(nsx(ns, "ip", "-j", "link").stdout)]


def master(ns, dev: str) -> str:
    return json.loads(nsx(ns, "ip", "-j", "link", "show", dev).stdout)[0].get("master", "")


def test_two_kernel_path_hosts(lab, kernel_hosts):
    h1, k1 = kernel_hosts("h1", "172.16.1.1")
    h2, k2 = kernel_hosts("h2", "172.16.2.1")
    # the fan alone on its port: the vxlan device is its bridge's port, as in the kernel's
    # own bridged vxlan, with no veth between
    assert {"fanvx-8472", "fanbr-241"} <= set(links(h1))
    assert not {"fan-241", "fanp-241"} & set(links(h1))
    assert master(h1, "fanvx-8472") == "fanbr-241"
    assert ping(h1, "241.2.1.1").returncode == 0
    assert ping(h2, "241.1.1.1").returncode == 0
    sent, got = tcp_transfer(h1, h2, "241.2.1.1", 16 << 20)
    assert sent == got and int(got[0]) == 16 << 20
    # the fan's semantics: no state per remote host, in the vxlan device or anywhere
    for ns in (h1, h2):
        assert nsx(ns, "ip", "neigh", "show", "dev", "fanvx-8472").stdout.strip() == ""
        fdb = json.loads(nsx(ns, "bridge", "-j", "fdb", "show", "dev", "fanvx-8472").stdout)
        assert [e for e in fdb if "permanent" not in e.get("state", "")] == [], fdb
    c1, c2 = k1.counters(), k2.counters()
    assert c1["tx_packets"] > 1000 and c2["rx_packets"] > 1000
    assert c1["drop_tx_send_error"] == c2["drop_rx_not_local"] == 0
    k1.close()      # taken down: nothing of the fan stays
    assert not {"fanvx-8472", "fan-241", "fanp-241", "fanbr-241"} & set(links(h1))


def test_kernel_path_and_userspace_fanpkt_reach_each_other(lab, kernel_hosts):
    """Peers cannot tell the two paths apart: ARP, ping and TCP both ways."""
    h1, _ = kernel_hosts("h1", "172.16.1.1")
    h2 = lab.host("h2", "172.16.2.1")
    lab.forward(h2, *VXLAN, "-u", "172.16.2.1/16", "--datapath", "user")
    assert ping(h1, "241.2.1.1").returncode == 0
    assert ping(h2, "241.1.1.1").returncode == 0
    for src, dst, addr in ((h1, h2, "241.2.1.1"), (h2, h1, "241.1.1.1")):
        sent, got = tcp_transfer(src, dst, addr, 8 << 20)
        assert sent == got and int(got[0]) == 8 << 20


SNIFF_VXLAN = """
import sys
from scapy.all import IP, UDP, Raw, sniff
print("listening", flush=True)
# no filter= (it needs tcpdump): scapy's own test on each packet
pkts = sniff(iface="eth0", count=3, timeout=20,
             lfilter=lambda p: IP in p and UDP in p and p[UDP].dport == 8472
             and p[IP].src == "172.16.1.1" and len(p[UDP].payload) > 8 + 14 + 28)
for p in pkts:
    ip = p[IP]
    raw = bytes(ip)
    chk = ip[UDP].chksum
    del ip[UDP].chksum
    good = IP(bytes(ip))[UDP].chksum
    print(ip.ttl, int(ip.flags), ip[UDP].dport, 32768 <= ip[UDP].sport <= 60999,
          bytes(ip[UDP].payload)[:8].hex(), chk == good and chk != 0, flush=True)
"""


def test_the_wire_is_the_fans(lab, kernel_hosts):
    """As the kernel's fan sends: UDP to 8472 from a flow-hash source port, the VXLAN
    header 08 00 00 00 + VNI, DF clear, TTL 64, a valid UDP checksum."""
    from lab import start
    h1, _ = kernel_hosts("h1", "172.16.1.1")
    h2, _ = kernel_hosts("h2", "172.16.2.1")
    sniffer = start(h2, sys.executable, "-c", SNIFF_VXLAN)
    ping(h1, "241.2.1.1", "-M", "do", count=6)      # inner DF set: the outer's stays clear
    out = sniffer.communicate(timeout=60)[0].split("\n")
    rows = [line.split() for line in out if line.strip()]
    assert len(rows) == 3, out
    for ttl, flags, dport, sport_ok, vxlan, csum_ok in rows:
        assert (ttl, flags, dport, sport_ok, csum_ok) == ("64", "0", "8472", "True", "True")
        assert vxlan == "08000000f1000000"


SEND_HOSTILE = """
import socket, struct, sys
from scapy.all import BOOTP, DHCP, Ether, IP, IPv6, Raw, UDP, ICMP
me, target, bridge_mac = sys.argv[1:4]
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
raw.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
def vx(inner, dst=target, src=me, vni=15794176):
    header = struct.pack("!BBBBI", 0x08, 0, 0, 0, vni << 8)
    pkt = bytes(IP(src=src, dst=dst) / UDP(sport=40000, dport=8472) / Raw(header) / inner)
    raw.sendto(pkt, (dst, 0))
BAD = Raw(b"FANTEST-hostile")
def ping_to(dst="241.1.1.9", src="241.9.9.2", mac="02:00:00:09:09:02", tag=BAD):
    return Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / IP(src=src, dst=dst) / ICMP() / tag
for _ in range(3):
    vx(ping_to(), vni=1)                                    # drop_rx_unknown_vni
    vx(ping_to(), src="10.99.0.2")                          # drop_rx_src_not_underlay
    vx(ping_to(), dst="172.16.255.255")                     # drop_rx_outer_dst
    vx(ping_to(src="241.7.7.7"))                            # drop_rx_spoofed_src
    vx(ping_to(mac=bridge_mac))                             # drop_rx_own_mac
    vx(ping_to(dst="241.5.5.5"))                            # drop_rx_not_local
    vx(Ether(src="02:00:00:09:09:02") / IPv6(dst="ff02::1") / BAD)  # drop_rx_bad_inner
    vx(Ether(src="02:00:00:09:09:02", dst="ff:ff:ff:ff:ff:ff") / IP(src="241.9.9.2",
       dst="241.1.1.9") / UDP(sport=68, dport=67) / BOOTP() /
       DHCP(options=[("message-type", "discover"), "end"]) / BAD)   # drop_rx_dhcp
    vx(ping_to(tag=Raw(b"FANTEST-legit")))                  # delivered
print("sent")
"""


COUNT_FRAMES = """
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))     # ETH_P_ALL
s.bind(("eth0", 0))
s.settimeout(0.5)
print("listening", flush=True)
n = {b"hostile": 0, b"legit": 0}
idle = time.monotonic() + 15
while time.monotonic() < idle:
    try:
        f, addr = s.recvfrom(65536)
    except socket.timeout:
        continue
    for tag in n:
        if addr[2] != socket.PACKET_OUTGOING and b"FANTEST-" + tag in f:
            n[tag] += 1
            idle = time.monotonic() + 3
print(n[b"hostile"], n[b"legit"], flush=True)
"""


def test_hostile_datagrams_are_dropped_and_counted(lab, kernel_hosts):
    """Each of the userspace path's hostile cases, on the kernel path: dropped by its
    reason, and only the legitimate frames reach the bridge (a container on it sees
    them, flooded, and nothing else of the sender's)."""
    from lab import poll, start
    h1, k1 = kernel_hosts("h1", "172.16.1.1")
    c = lab.container(h1, "c", "241.1.1.9", "241.1.1.1", bridge="fanbr-241", plen=8,
                      mtu=1450)
    evil = lab.host("evil", "172.16.9.9")
    nsx(evil, "ip", "addr", "add", "10.99.0.2/8", "dev", "eth0")
    nsx(h1, "ip", "addr", "add", "10.99.0.1/8", "dev", "eth0")
    mac = nsx(h1, "cat", "/sys/class/net/fanbr-241/address").stdout.strip()
    seen = start(c, sys.executable, "-c", COUNT_FRAMES)
    nsx(evil, sys.executable, "-c", SEND_HOSTILE, "172.16.9.9", "172.16.1.1", mac,
        timeout=120)
    want = {"drop_rx_unknown_vni": 3, "drop_rx_src_not_underlay": 3, "drop_rx_outer_dst": 3,
            "drop_rx_spoofed_src": 3, "drop_rx_own_mac": 3, "drop_rx_not_local": 3,
            "drop_rx_bad_inner": 3, "drop_rx_dhcp": 3, "rx_packets": 3}
    got = poll(lambda: (lambda n: n if all(n.get(k, 0) >= v for k, v in want.items())
                        else None)(k1.counters()), "the hostile datagrams were not counted",
               timeout=30)
    assert {k: got[k] for k in want} == want, got
    assert seen.communicate(timeout=60)[0].split() == ["0", "3"]      # hostile, legit


# -- fanpkt-forward with --datapath ----------------------------------------------------------
def forwarders(lab, *extra, n=2):
    hosts = []
    for i in range(1, n + 1):
        addr = f"172.16.{i}.1"
        ns = lab.host(f"h{i}", addr)
        nsx(ns, "ethtool", "-K", "eth0", "tx", "off")   # as kernel_hosts says why
        lab.forward(ns, *VXLAN, "-u", f"{addr}/16", *extra)
        hosts.append(ns)
    return hosts


def stats(ns) -> dict:
    from lab import FANPKT
    return json.loads(nsx(ns, *FANPKT, "stats", "--json").stdout)


def test_forwarder_runs_a_fan_on_the_kernel_path(lab):
    """--datapath kernel: the fan's bridge port is the kernel path's, no loop of the
    engine serves it, its counters reach `fanpkt stats` and /metrics, which say which path
    the fan runs on, and a stop leaves nothing."""
    from lab import FANPKT, poll
    from test_metrics import METRICS, samples, scrape
    h1, h2 = forwarders(lab, "--datapath", "kernel", "--metrics", METRICS)
    assert ping(h1, "241.2.1.1").returncode == 0 and ping(h2, "241.1.1.1").returncode == 0
    sent, got = tcp_transfer(h1, h2, "241.2.1.1", 8 << 20)
    assert sent == got
    s = stats(h1)
    assert [f["datapath"] for f in s["fans"]] == ["kernel"]
    assert not [k for k in s["loops"] if not k.startswith(("tx:", "rx"))]
    assert "rx-vxlan:8472" not in s["loops"]            # no userspace socket on the port
    poll(lambda: stats(h2)["total"]["rx_packets"] > 1000, "no counters from the kernel path")
    text = nsx(h1, *FANPKT, "stats").stdout
    assert "fan fan-241: 241.0.0.0/8 vxlan, kernel path" in text, text
    status, body = scrape(h2)
    got = samples(body)
    assert status == "200" and got[("fanpkt_fan_datapath",
                                     (("datapath", "kernel"), ("fan", "fan-241")))] == 1
    assert got[("fanpkt_packets_total", (("direction", "rx"), ("fan", "fan-241")))] > 1000, \
        sorted(k for k in got if "packets_total" in k[0])
    lab.stop(lab.procs[0])
    assert not {"fanvx-8472", "fan-241", "fanp-241", "fanbr-241"} & set(links(h1))


def test_auto_falls_back_to_the_engine_and_kernel_fails_clearly(lab):
    """A port that serves userspace fans cannot take the kernel path's device: auto says
    so in one line and takes the engine; kernel refuses with exit status 4."""
    from lab import FANPKT
    h1 = lab.host("h1", "172.16.1.1")
    lab.forward(h1, *VXLAN, "-u", "172.16.1.1/16", "--datapath", "user")    # the engine's 8472
    r = nsx(h1, *FANPKT, "up", "250.0.0.0/8", "172.16.1.1/16", "type", "vxlan",
            "datapath", "kernel", check=False)
    assert r.returncode == 4 and "no kernel data path: UDP port 8472 serves userspace " \
        "fans here" in r.stderr, r.stderr
    assert [f["device"] for f in stats(h1)["fans"]] == ["fan-241"]     # nothing half up
    r = nsx(h1, *FANPKT, "up", "250.0.0.0/8", "172.16.1.1/16", "type", "vxlan",
            "datapath", "auto", check=False)
    assert r.returncode == 0, r.stderr
    assert [f["datapath"] for f in stats(h1)["fans"]] == ["user", "user"]
    log = open(lab.logs[h1]).read()
    assert ("250.0.0.0/8: on the userspace engine, since the kernel path cannot be set up "
            "(UDP port 8472 serves userspace fans here)") in log


def test_the_kernel_path_forwards_without_a_forwarder_and_a_restart_replaces_it(lab):
    """Attached programs outlive the process: after kill -9 the fan still carries pings;
    the next start removes what was left and sets the fan up anew."""
    import signal
    h1, h2 = forwarders(lab, "--datapath", "kernel")
    p1 = lab.procs[0]
    lab.stop(p1, sig=signal.SIGKILL)
    assert ping(h1, "241.2.1.1").returncode == 0            # no forwarder in h1
    lab.forward(h1, *VXLAN, "-u", "172.16.1.1/16", "--datapath", "kernel")
    assert ping(h1, "241.2.1.1").returncode == 0 and ping(h2, "241.1.1.1").returncode == 0
    assert sorted(n for n in links(h1) if n.startswith("fan")) == \
        ["fanbr-241", "fanvx-8472"]


def test_up_and_down_on_the_kernel_path(lab):
    """`fanpkt up` adds a kernel-path fan to a running forwarder (its devices and
    programs, set up after capabilities were dropped), `down` removes all of it."""
    from lab import FANPKT
    h1, h2 = forwarders(lab, "--datapath", "kernel")
    for ns, addr in ((h1, "172.16.1.1"), (h2, "172.16.2.1")):
        r = nsx(ns, *FANPKT, "up", "250.0.0.0/8", f"{addr}/16", "type", "vxlan", "vni", "7",
                "datapath", "kernel", check=False)
        assert r.returncode == 0, r.stderr
    # the second fan on the port: a veth pair redirected to and from the vxlan device,
    # whose own fan's program passes the frames it steered on
    assert master(h1, "fan-250") == "fanbr-250"
    assert ping(h1, "250.2.1.1").returncode == 0
    assert ping(h1, "241.2.1.1").returncode == 0
    r = nsx(h1, *FANPKT, "down", "-o", "250.0.0.0/8", check=False)
    assert r.returncode == 0, r.stderr
    assert {"fan-250", "fanp-250", "fanbr-250"}.isdisjoint(links(h1))
    assert master(h1, "fanvx-8472") == "fanbr-241"
    assert ping(h1, "241.2.1.1").returncode == 0


def test_a_vxlan_fan_added_to_an_ipip_only_forwarder_takes_the_kernel_path(lab):
    """The eBPF object is loaded at start whatever the fans: a VXLAN fan that `fanpkt up`
    adds after the forwarder dropped its capabilities still gets the kernel path."""
    from lab import FANPKT
    hosts = []
    for i in (1, 2):
        ns = lab.host(f"h{i}", f"172.16.{i}.1")
        lab.forward(ns, "-o", "10.0.0.0/8", "-u", f"172.16.{i}.1/16")       # IPIP alone
        r = nsx(ns, *FANPKT, "up", "241.0.0.0/8", f"172.16.{i}.1/16", "type", "vxlan",
                check=False)
        assert r.returncode == 0, r.stderr
        hosts.append(ns)
    h1, h2 = hosts
    assert {f["device"]: f["datapath"] for f in stats(h1)["fans"]} == \
        {"fan-10": "user", "fan-241": "kernel"}
    assert ping(h1, "241.2.1.1").returncode == 0 and ping(h1, "10.2.1.1").returncode == 0
    assert "libbpf" not in open(lab.logs[h1]).read()


def test_the_underlay_address_moving_to_another_interface_changes_nothing(lab):
    """The vxlan device is bound to no interface and sends from the fan's own address:
    when that address moves (here onto a bridge over eth0), the forwarder follows it and
    the kernel path forwards on, both ways, with nothing to replace."""
    from lab import poll
    h1, h2 = forwarders(lab, "--datapath", "kernel")
    assert ping(h1, "241.2.1.1").returncode == 0
    nsx(h1, "ip", "link", "add", "br9", "type", "bridge")
    nsx(h1, "ip", "link", "set", "eth0", "master", "br9")
    nsx(h1, "ip", "link", "set", "br9", "up")
    nsx(h1, "ip", "addr", "del", "172.16.1.1/16", "dev", "eth0")
    nsx(h1, "ip", "addr", "add", "172.16.1.1/16", "dev", "br9")
    poll(lambda: "underlay address 172.16.1.1 now on br9" in open(lab.logs[h1]).read(),
         "the forwarder did not follow the address")
    assert ping(h1, "241.2.1.1").returncode == 0 and ping(h2, "241.1.1.1").returncode == 0
    sent, got = tcp_transfer(h2, h1, "241.1.1.1", 4 << 20)
    assert sent == got and int(got[0]) == 4 << 20


SEND_LOCAL_MAC = """
import socket, struct, sys
from scapy.all import Ether, IP, ICMP, Raw, UDP
mac = sys.argv[1]
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
header = struct.pack("!BBBBI", 0x08, 0, 0, 0, 15794176 << 8)
inner = Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / IP(src="241.9.9.2", dst="241.1.1.9") / ICMP()
for _ in range(5):
    pkt = bytes(IP(src="172.16.9.9", dst="172.16.1.1") / UDP(sport=40000, dport=8472) /
                Raw(header) / inner)
    raw.sendto(pkt, ("172.16.1.1", 0))
print("sent")
"""


def test_a_local_mac_from_the_wire_is_dropped_on_the_kernel_path(lab):
    """The forwarder gives the kernel path this host's MACs on its fan bridges, as it
    gives the engine: a frame from the wire that claims a local container's MAC is
    dropped (drop_rx_local_mac) and the MAC stays on the container's port."""
    from lab import poll
    h1 = lab.host("h1", "172.16.1.1")
    lab.forward(h1, *VXLAN, "-u", "172.16.1.1/16", "--datapath", "kernel")
    c = lab.container(h1, "c", "241.1.1.9", "241.1.1.1", bridge="fanbr-241", plen=8,
                      mtu=1450)
    mac = nsx(c, "cat", "/sys/class/net/eth0/address").stdout.strip()
    assert ping(c, "241.1.1.1", count=1).returncode == 0       # the bridge learns it
    evil = lab.host("evil", "172.16.9.9")

    def counted():
        nsx(evil, sys.executable, "-c", SEND_LOCAL_MAC, mac)
        return stats(h1)["total"]["drop_rx_local_mac"] >= 5
    poll(counted, "the local MAC from the wire was not dropped", timeout=20, every=1)
    fdb = json.loads(nsx(h1, "bridge", "-j", "fdb", "show", "br", "fanbr-241").stdout)
    assert [e.get("ifname") for e in fdb if e["mac"] == mac] == ["vc"]


def test_sighup_reload_on_the_kernel_path(lab, tmp_path):
    """A reload adds and removes kernel-path fans like any others, and the one that stays
    forwards throughout."""
    import signal

    from lab import poll
    conf = {}
    procs = []
    for i in (1, 2):
        addr = f"172.16.{i}.1"
        ns = lab.host(f"h{i}", addr)
        conf[ns] = tmp_path / f"fan{i}"
        conf[ns].write_text(f"241.0.0.0/8 {addr}/16 type vxlan datapath kernel\n")
        procs.append(lab.forward(ns, "-c", str(conf[ns])))
    h1, h2 = conf
    assert ping(h1, "241.2.1.1").returncode == 0
    for (ns, path), p, i in zip(conf.items(), procs, (1, 2)):
        path.write_text(f"241.0.0.0/8 172.16.{i}.1/16 type vxlan datapath kernel\n"
                        f"250.0.0.0/8 172.16.{i}.1/16 type vxlan vni 9 datapath kernel\n")
        p.send_signal(signal.SIGHUP)
    for ns in conf:
        poll(lambda: "fan-250" in links(ns), "the reload did not add the second fan")
    assert ping(h1, "250.2.1.1").returncode == 0 and ping(h1, "241.2.1.1").returncode == 0
    conf[h1].write_text("250.0.0.0/8 172.16.1.1/16 type vxlan vni 9 datapath kernel\n")
    procs[0].send_signal(signal.SIGHUP)
    # the first fan had the vxlan device as its port: it leaves the bridge, which goes,
    # and stays for the second fan, whose frames it carries on
    poll(lambda: "fanbr-241" not in links(h1), "the reload did not remove the first fan")
    assert "fanvx-8472" in links(h1) and master(h1, "fanvx-8472") == ""
    assert ping(h1, "250.2.1.1").returncode == 0 and ping(h2, "250.1.1.1").returncode == 0


def test_a_port_held_elsewhere_and_an_ipip_fan_are_refused_clearly(lab):
    """datapath kernel where another vxlan device holds the port: one line, exit status 4,
    nothing left; auto then tries the engine, which cannot have the port either. An IPIP
    fan takes no datapath but user: a configuration error, exit status 2."""
    from lab import FORWARD
    h1 = lab.host("h1", "172.16.1.1")
    nsx(h1, "ip", "link", "add", "kvx", "type", "vxlan", "id", "9", "dstport", "8472",
        "dev", "eth0")
    nsx(h1, "ip", "link", "set", "kvx", "up")               # its socket holds 8472
    r = nsx(h1, *FORWARD, *VXLAN, "-u", "172.16.1.1/16", "--datapath", "kernel",
            check=False)
    assert r.returncode == 4, r.stdout + r.stderr
    assert "241.0.0.0/8: no kernel data path: UDP port 8472 is taken" in r.stdout + r.stderr
    assert not {"fan-241", "fanp-241", "fanbr-241", "fanvx-8472"} & set(links(h1))
    r = nsx(h1, *FORWARD, *VXLAN, "-u", "172.16.1.1/16", "--datapath", "auto", check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 4 and "on the userspace engine, since the kernel path cannot " \
        "be set up (UDP port 8472 is taken" in out and "UDP port 8472 is taken on this " \
        "host" in out, out
    r = nsx(h1, *FORWARD, "-o", "241.0.0.0/8", "-u", "172.16.1.1/16", "--datapath",
            "kernel", check=False)
    assert r.returncode == 2 and "an IPIP fan runs on the userspace engine" in r.stderr


def test_without_the_ebpf_object_auto_starts_on_the_engine_and_kernel_fails(lab):
    """A build without clang has no eBPF object (FANPKT_BPF_OBJECT names a missing one
    here): a forwarder with datapath auto starts with its fan on the userspace engine and
    says why; with datapath kernel it exits 4, leaving nothing."""
    from lab import FORWARD
    h1, h2 = (lab.host(n, a) for n, a in (("h1", "172.16.1.1"), ("h2", "172.16.2.1")))
    env = {"FANPKT_BPF_OBJECT": "/nonexistent/fan_vxlan.bpf.o"}
    lab.forward(h1, *VXLAN, "-u", "172.16.1.1/16", "--datapath", "auto", env=env)
    lab.forward(h2, *VXLAN, "-u", "172.16.2.1/16")
    assert [f["datapath"] for f in stats(h1)["fans"]] == ["user"]
    assert ping(h1, "241.2.1.1").returncode == 0
    assert ("241.0.0.0/8: on the userspace engine, since the kernel path cannot be set up "
            "(the eBPF object /nonexistent/fan_vxlan.bpf.o was not built") in \
        open(lab.logs[h1]).read()
    h3 = lab.host("h3", "172.16.3.1")
    r = nsx(h3, "env", "FANPKT_BPF_OBJECT=/nonexistent/fan_vxlan.bpf.o", *FORWARD, *VXLAN,
            "-u", "172.16.3.1/16", "--datapath", "kernel", check=False)
    assert r.returncode == 4 and "no kernel data path: the eBPF object" in r.stderr, r.stderr
    assert not {"fan-241", "fanp-241", "fanbr-241", "fanvx-8472"} & set(links(h3))


def test_an_auto_fan_beside_a_userspace_fan_on_its_port_at_start(lab, tmp_path):
    """At start the engine's socket for a port is opened after every fan has its device:
    an auto fan listed after a userspace fan of the same port must still see that the
    port is the engine's, and take the engine too."""
    h1 = lab.host("h1", "172.16.1.1")
    conf = tmp_path / "fan"
    conf.write_text("241.0.0.0/8 172.16.1.1/16 type vxlan datapath user\n"
                    "250.0.0.0/8 172.16.1.1/16 type vxlan vni 9\n")
    lab.forward(h1, "-c", str(conf))
    assert [f["datapath"] for f in stats(h1)["fans"]] == ["user", "user"]
