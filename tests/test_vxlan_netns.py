"""The VXLAN fan end to end (docs/spec.md §6): fanpkt hosts in namespaces, with each
other and with this machine's own kernel vxlan driver, as operators run them. Packets are
checked with ordinary tools and sockets, and on the wire with scapy."""
from __future__ import annotations

import json
import os
import sys

import pytest

from lab import (DHCP_DISCOVER, FANPKT, TRAFFIC, bridge_ports, bulk_checks, fan_port,
                 link_names, nsx, ping, poll, sh, start, tcp_transfer, udp_sizes)

VXLAN = ["-o", "241.0.0.0/8", "--type", "vxlan"]
VNI = 15794176                      # 241.0.0.0/8 >> 8, LXD's default


# the tests marked with it run on both data paths: the userspace engine, and the kernel's
# own vxlan driver steered by fanpkt's eBPF programs (fanpkt/kernelpath.py)
BOTH_PATHS = pytest.mark.parametrize("datapath", ["user", "kernel"])


def vxlan_hosts(lab, n=2, *extra, datapath="user"):
    hosts = []
    for i in range(1, n + 1):
        addr = f"172.16.{i}.1"
        ns = lab.host(f"h{i}", addr)
        lab.forward(ns, *VXLAN, "-u", f"{addr}/16", "--datapath", datapath, *extra)
        hosts.append(ns)
    return hosts


def neighbour_mac(ns, addr, dev="fanbr-241"):
    out = json.loads(nsx(ns, "ip", "-j", "neigh", "show", addr, "dev", dev).stdout)
    return out[0].get("lladdr") if out else None


def link_mac(ns, dev):
    return nsx(ns, "cat", f"/sys/class/net/{dev}/address").stdout.strip()


@BOTH_PATHS
def test_two_hosts_arp_ping_tcp_udp(lab, datapath):
    h1, h2 = vxlan_hosts(lab, datapath=datapath)
    assert ping(h1, "241.2.1.1").returncode == 0
    assert ping(h2, "241.1.1.1").returncode == 0
    # ARP crossed the fan: each host resolved the other's gateway to its bridge's MAC,
    # which fanpkt derives from the overlay and the underlay address
    assert neighbour_mac(h1, "241.2.1.1") == link_mac(h2, "fanbr-241") == "02:f1:ac:10:02:01"
    assert neighbour_mac(h2, "241.1.1.1") == link_mac(h1, "fanbr-241") == "02:f1:ac:10:01:01"
    assert "241.1.1.1/8" in nsx(h1, "ip", "-4", "addr", "show", "fanbr-241").stdout
    assert nsx(h1, "cat", "/sys/class/net/fanbr-241/mtu").stdout.strip() == "1450"
    s2 = bulk_checks(lab, h1, h2, "241.2.1.1", 1450)
    assert s2["drop_rx_spoofed_src"] == s2["drop_rx_unknown_vni"] == 0


@BOTH_PATHS
def test_containers_get_address_and_mtu_by_dhcp(lab, datapath):
    """`dhcp` on a VXLAN fan, as LXD serves it: an address of the slice, the gateway as
    router, the whole overlay on-link (/8) and MTU 1450; then container to container."""
    h1, h2 = vxlan_hosts(lab, 2, "dhcp", datapath=datapath)
    containers = []
    for ns, name in ((h1, "c1"), (h2, "c2")):
        cns = f"{lab.prefix}{name}"
        lab._add_ns(cns)
        sh("ip", "link", "add", "eth0", "netns", cns, "type", "veth", "peer", "name",
           f"v{name}", "netns", ns)
        nsx(ns, "ip", "link", "set", f"v{name}", "master", "fanbr-241", "up")
        nsx(cns, "ip", "link", "set", "eth0", "up")
        out = start(cns, sys.executable, "-c", DHCP_DISCOVER).communicate(timeout=60)[0]
        addr, router, mtu, netmask, kind = out.split()
        gw = "241.1.1.1" if name == "c1" else "241.2.1.1"
        assert (router, mtu, netmask, kind) == (gw, "1450", "255.0.0.0", "2"), out
        assert addr.startswith(gw[:-1]) and 2 <= int(addr.rsplit(".", 1)[1]) <= 254
        nsx(cns, "ip", "link", "set", "eth0", "mtu", mtu)
        nsx(cns, "ip", "addr", "add", f"{addr}/8", "dev", "eth0")
        nsx(cns, "ip", "route", "add", "default", "via", router)
        containers.append((cns, addr))
    (c1, a1), (c2, a2) = containers
    assert ping(c1, a2).returncode == 0 and ping(c2, a1).returncode == 0
    sent, got = tcp_transfer(c1, c2, a2, 8 << 20)
    assert sent == got


@BOTH_PATHS
def test_eight_hosts_full_mesh(lab, datapath):
    """Every host reaches every other (each ping resolves the peer by ARP across the fan
    first); a transfer and every UDP size between the two ends of the underlay."""
    hosts = vxlan_hosts(lab, 8, datapath=datapath)
    for i, ns in enumerate(hosts, 1):
        for j in range(1, 9):
            assert ping(ns, f"241.{j}.1.1", count=1).returncode == 0, (i, j)
        assert len(json.loads(nsx(ns, "ip", "-j", "neigh", "show", "dev",
                                  "fanbr-241").stdout)) == 7, i      # the 7 others
    sent, got = tcp_transfer(hosts[0], hosts[7], "241.8.1.1", 16 << 20)
    assert sent == got and int(got[0]) == 16 << 20
    assert udp_sizes(hosts[7], hosts[0], "241.1.1.1", 1422) == ["1422", "1", "1422"]


SNIFF_VXLAN = """
import json, sys
from scapy.all import IP, UDP, sniff
n = int(sys.argv[1])
print("listening", flush=True)
pkts = sniff(iface="eth0", count=n, timeout=30,
             lfilter=lambda p: IP in p and UDP in p and p[UDP].dport == 8472)
out = []
for p in pkts:
    ip, u = p[IP], p[UDP]
    again = IP(bytes(ip))
    del again.chksum, again[UDP].chksum
    again = IP(bytes(again))
    v = bytes(u.payload)
    out.append({"src": ip.src, "dst": ip.dst, "ttl": ip.ttl, "df": int(ip.flags.DF),
                "sport": u.sport, "dport": u.dport, "csum": u.chksum,
                "csum_ok": again[UDP].chksum == u.chksum, "ip_csum_ok": again.chksum == ip.chksum,
                "header": v[:8].hex(), "inner_len": len(v) - 8})
print(json.dumps(out))
"""


def kernel_vxlan_host(lab, name, addr, peer):
    """A host whose fan is the kernel's own vxlan driver, configured as the Ubuntu fan
    would be for two hosts (this kernel has no fan map): VNI 15794176, port 8472, a
    default FDB entry to the one peer, on a bridge holding the gateway with the overlay's
    prefix. Checksum offload is off on its NIC so that captures show final checksums."""
    ns = lab.host(name, addr)
    third, fourth = addr.split(".")[2:]
    nsx(ns, "ethtool", "-K", "eth0", "tx", "off")
    nsx(ns, "ip", "link", "add", "vx0", "type", "vxlan", "id", str(VNI), "dstport", "8472",
        "local", addr, "dev", "eth0", "udpcsum")
    nsx(ns, "bridge", "fdb", "append", "00:00:00:00:00:00", "dev", "vx0", "dst", peer)
    nsx(ns, "ip", "link", "add", "br0", "type", "bridge")
    nsx(ns, "ip", "link", "set", "vx0", "master", "br0", "mtu", "1450", "up")
    nsx(ns, "ip", "link", "set", "br0", "mtu", "1450", "up")
    nsx(ns, "ip", "addr", "add", f"241.{third}.{fourth}.1/8", "dev", "br0")
    return ns


@BOTH_PATHS
def test_interop_with_the_kernels_vxlan(lab, datapath):
    h1 = lab.host("h1", "172.16.1.1")
    nsx(h1, "ethtool", "-K", "eth0", "tx", "off")
    lab.forward(h1, *VXLAN, "-u", "172.16.1.1/16", "--datapath", datapath)
    h2 = kernel_vxlan_host(lab, "h2", "172.16.2.1", peer="172.16.1.1")
    sniffer = start(h2, sys.executable, "-c", SNIFF_VXLAN, "8")
    try:
        assert ping(h2, "241.1.1.1", count=2).returncode == 0      # kernel -> fanpkt
        assert ping(h1, "241.2.1.1", count=2).returncode == 0      # fanpkt -> kernel
        wire = json.loads(sniffer.communicate(timeout=60)[0])
    finally:
        sniffer.kill()
    ours = [p for p in wire if p["src"] == "172.16.1.1"]
    kernels = [p for p in wire if p["src"] == "172.16.2.1"]
    assert ours and kernels, wire
    for p in wire:
        # what both send: port 8472, flags I, VNI 0xf10000, reserved zero, a valid
        # non-zero UDP checksum, DF clear, TTL 64, an ephemeral source port
        assert p["dport"] == 8472 and p["header"] == "08000000f1000000", p
        assert p["csum"] != 0 and p["csum_ok"] and p["ip_csum_ok"], p
        assert p["df"] == 0 and p["ttl"] == 64 and 32768 <= p["sport"] <= 60999, p
    # TCP both ways, hashes matching
    for src, dst, addr in ((h1, h2, "241.2.1.1"), (h2, h1, "241.1.1.1")):
        sent, got = tcp_transfer(src, dst, addr, 8 << 20)
        assert sent == got and int(got[0]) == 8 << 20
    s = lab.stats(h1)
    assert s["drop_rx_unknown_vni"] == s["drop_rx_bad_vxlan"] == s["drop_rx_spoofed_src"] == 0


SEND_HOSTILE = """
import struct, sys
from scapy.all import ARP, Ether, IP, IPv6, Raw, UDP, send
dst, own_mac = sys.argv[1], sys.argv[2]
me, outside = "172.16.9.9", "10.99.0.1"
def vx(inner, vni=15794176, src=me):
    header = struct.pack("!BBBBI", 0x08, 0, 0, 0, vni << 8)     # flags I, VNI, reserved 0
    return IP(src=src, dst=dst) / UDP(sport=40000, dport=8472) / Raw(header) / inner
ok = Ether(src="02:00:00:09:09:09", dst="ff:ff:ff:ff:ff:ff")
cases = [
    vx(ok / IP(src="241.9.9.2", dst="241.2.1.1") / Raw(b"x"), vni=1),          # wrong VNI
    vx(ok / IP(src="241.9.9.2", dst="241.2.1.1") / Raw(b"x"), src=outside),    # outside
    vx(ok / IP(src="241.1.1.7", dst="241.2.1.1") / Raw(b"x")),                 # spoofed
    vx(ok / ARP(psrc="241.1.1.7", pdst="241.2.1.1")),                          # spoofed ARP
    vx(Ether(src=own_mac, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="241.9.9.2",
                                                         pdst="241.2.1.1")),  # our MAC
    vx(Ether(src="02:00:00:09:09:09") / IPv6(dst="ff02::1")),                  # not IPv4/ARP
    IP(src=me, dst=dst) / UDP(sport=40000, dport=8472) / Raw(bytes(10)),       # truncated
]
for p in cases:
    send(p, count=5, verbose=0)
print("sent")
"""


def test_hostile_vxlan_is_dropped_counted_and_never_bridged(lab):
    h1, h2 = vxlan_hosts(lab)
    evil = lab.host("evil", "172.16.9.9")
    nsx(evil, "ip", "addr", "add", "10.99.0.1/8", "dev", "eth0")
    assert ping(h1, "241.2.1.1", count=1).returncode == 0
    before = json.loads(nsx(h2, "ip", "-s", "-j", "link", "show", "fan-241").stdout)[0]
    rx_before = lab.stats(h2)["rx_packets"]
    nsx(evil, sys.executable, "-c", SEND_HOSTILE, "172.16.2.1", link_mac(h2, "fanbr-241"))
    want = {"drop_rx_unknown_vni": 5, "drop_rx_src_not_underlay": 5,
            "drop_rx_spoofed_src": 10, "drop_rx_own_mac": 5, "drop_rx_bad_inner": 5,
            "drop_rx_truncated": 5}
    s = poll(lambda: (lambda s: s if all(s[k] >= v for k, v in want.items()) else None)(
        lab.stats(h2)), "the hostile datagrams were not all counted")
    assert {k: s[k] for k in want} == want
    assert s["rx_packets"] == rx_before
    after = json.loads(nsx(h2, "ip", "-s", "-j", "link", "show", "fan-241").stdout)[0]
    # what fanpkt writes into the TAP is the TAP's receive side: nothing was written
    assert after["stats64"]["rx"]["packets"] == before["stats64"]["rx"]["packets"]
    assert ping(h1, "241.2.1.1", count=1).returncode == 0


def vxlan_and_ipip_hosts(lab, tmp_path, *h1_flags):
    """Two hosts, each a forwarder with a VXLAN fan (241/8) and an IPIP fan (10/8) from a
    file that names no datapath: (namespace, the file, the process) each."""
    hosts = []
    for i in (1, 2):
        ns = lab.host(f"h{i}", f"172.16.{i}.1")
        conf = tmp_path / f"fan{i}"
        conf.write_text(f"241.0.0.0/8 172.16.{i}.1/16 type vxlan\n"
                        f"10.0.0.0/8 172.16.{i}.1/16\n")
        hosts.append((ns, conf, lab.forward(ns, "-c", str(conf),
                                            *(h1_flags if i == 1 else ()))))
    return hosts


def test_ipip_and_vxlan_fans_side_by_side(lab, tmp_path):
    """One process, an IPIP fan and a VXLAN fan on different overlays; show, stats and a
    SIGHUP that takes the VXLAN fan away and brings it back."""
    (h1, conf1, p1), (h2, _, _) = vxlan_and_ipip_hosts(lab, tmp_path)
    assert ping(h1, "241.2.1.1").returncode == 0 and ping(h1, "10.2.1.1").returncode == 0
    show = nsx(h1, *FANPKT, "show").stdout
    assert "fanbr-241" in show and "type vxlan" in show and "fan-10" in show
    stats = nsx(h1, *FANPKT, "stats").stdout
    assert "fan fan-241: 241.0.0.0/8 vxlan" in stats and "fan fan-10: 10.0.0.0/8 ipip" in stats
    conf1.write_text("10.0.0.0/8 172.16.1.1/16\n")
    p1.send_signal(1)
    poll(lambda: nsx(h1, "ip", "link", "show", "fanbr-241", check=False).returncode,
         "the removed VXLAN fan's bridge stayed")
    poll(lambda: ":8472 " not in nsx(h1, "ss", "-ulpn").stdout,
         "the removed VXLAN fan's UDP socket stayed open")
    assert ping(h1, "10.2.1.1").returncode == 0
    conf1.write_text("241.0.0.0/8 172.16.1.1/16 type vxlan\n10.0.0.0/8 172.16.1.1/16\n")
    p1.send_signal(1)
    poll(lambda: ping(h1, "241.2.1.1", count=1).returncode == 0,
         "the VXLAN fan did not come back")


def test_given_no_datapath_vxlan_takes_the_kernel_path_and_ipip_the_engine(lab, tmp_path):
    """auto is the default: a VXLAN fan given no datapath runs on the kernel path, which
    this kernel has (`stats --json`, `show`, /metrics and the devices say so); an IPIP fan
    beside it, given none either, on the userspace engine. Both carry traffic, and a
    VXLAN fan given no flag on the command line takes the kernel path as well."""
    from test_metrics import METRICS, samples, scrape
    (h1, _, p), (h2, _, _) = vxlan_and_ipip_hosts(lab, tmp_path, "--metrics", METRICS)
    threads = {open(f"/proc/{p.pid}/task/{t}/comm").read().strip()
               for t in os.listdir(f"/proc/{p.pid}/task")}
    s = json.loads(nsx(h1, *FANPKT, "stats", "--json").stdout)
    assert {f["device"]: f["datapath"] for f in s["fans"]} == {"fan-241": "kernel",
                                                              "fan-10": "user"}
    # the engine's loops serve the IPIP fan only: no transmit loop for fan-241, no
    # userspace socket on the VXLAN port
    assert "fanpkt-tx-10" in threads and not {"fanpkt-tx-241", "fanpkt-rxv-8472"} & threads
    assert "rx-vxlan:8472" not in s["loops"]
    show = nsx(h1, *FANPKT, "show").stdout.splitlines()
    assert [line.split()[3:] for line in show[1:]] == [["type", "vxlan", "datapath", "kernel"],
                                                       ["-"]], show
    got = samples(scrape(h1)[1])
    assert {dict(k[1])["fan"]: dict(k[1])["datapath"] for k in got
            if k[0] == "fanpkt_fan_datapath"} == {"fan-241": "kernel", "fan-10": "user"}

    def kind(ns, dev):
        return json.loads(nsx(ns, "ip", "-d", "-j", "link", "show", dev).stdout)[0][
            "linkinfo"]["info_kind"]
    # the kernel path's devices: the port's flow-based vxlan device, the fan's bridge port
    # (the fan alone on its port); IPIP's TUN
    assert (kind(h1, "fanvx-8472"), kind(h1, "fan-10")) == ("vxlan", "tun")
    assert fan_port(h1, "fanbr-241", "fan-241") == "fanvx-8472"
    assert ping(h1, "241.2.1.1").returncode == 0 and ping(h1, "10.2.1.1").returncode == 0
    assert ping(h2, "241.1.1.1").returncode == 0 and ping(h2, "10.1.1.1").returncode == 0
    # the command line's fan, with no flag but its type
    h3 = lab.host("h3", "172.16.3.1")
    lab.forward(h3, *VXLAN, "-u", "172.16.3.1/16")
    fans = json.loads(nsx(h3, *FANPKT, "stats", "--json").stdout)["fans"]
    assert [f["datapath"] for f in fans] == ["kernel"]
    assert ping(h3, "241.1.1.1").returncode == 0


@pytest.mark.parametrize("peer", ["fanpkt", "kernel"])
def test_small_datagrams_of_one_flow_leave_in_udp_gso_runs_intact_and_in_order(lab, peer):
    """Bursts of 64-byte datagrams of one flow: h1's transmit loop reads several frames
    at once and sends each burst as one UDP GSO superpacket (docs/internals.md §3, Runs). Whether
    fanpkt or the kernel's vxlan receives them, every datagram arrives, in order (the
    sink's kernel checks each UDP checksum, so a mangled one would be missing). The
    userspace engine's transmit loop is what this tests: both fanpkt hosts run it."""
    h1 = lab.host("h1", "172.16.1.1")
    lab.forward(h1, *VXLAN, "-u", "172.16.1.1/16", "--datapath", "user")
    if peer == "kernel":
        h2 = kernel_vxlan_host(lab, "h2", "172.16.2.1", peer="172.16.1.1")
    else:
        h2 = lab.host("h2", "172.16.2.1")
        lab.forward(h2, *VXLAN, "-u", "172.16.2.1/16", "--datapath", "user")
    # runs go to resolved neighbours only: wait until h1 sends frames to h2
    poll(lambda: ping(h1, "241.2.1.1", count=1).returncode == 0
         and lab.stats(h1)["tx_l2"] > 0, "h1 sending frames to its resolved peer")
    before = lab.stats(h1)
    sink = start(h2, *TRAFFIC, "udp-flows-sink", "7100", "2")
    nsx(h1, *TRAFFIC, "udp-flows", "241.2.1.1", "7100", "1", "4000", timeout=120)
    got = json.loads(sink.communicate(timeout=120)[0])
    assert got["reordered"] == 0 and list(got["flows"].values()) == [4000], got
    after = lab.stats(h1)
    joined = after["tx_gso_joined"] - before["tx_gso_joined"]
    assert joined > 0 and after["tx_gso"] > before["tx_gso"], (joined, after)
    assert after["tx_packets"] - before["tx_packets"] >= 4000
    assert after["drop_tx_send_error"] == after["tx_gso_fallback"] == 0


def test_joins_a_bridge_that_already_holds_the_gateway_and_leaves_it_so(lab):
    """An LXD-managed bridge (docs/lxd.md) already holds the slice gateway with the
    overlay's prefix: `bridge NAME` joins it as it is, and neither a clean stop nor the
    cleanup after a crash removes the address or its route, which are the bridge owner's."""
    h1 = lab.host("h1", "172.16.1.1")
    h2 = lab.host("h2", "172.16.2.1")
    # a MAC of its own, as LXD gives its bridges (else the bridge would take its lowest
    # port's, and change with fanpkt's TAP)
    for cmd in ("ip link add lxdst0 address 00:16:3e:00:01:01 type bridge",
                "ip link set lxdst0 mtu 1450 up",
                "ip addr add 241.1.1.1/8 dev lxdst0"):
        nsx(h1, *cmd.split())
    owned = ("ip -4 -o addr show dev lxdst0", "ip -4 route show dev lxdst0")
    before = {c: nsx(h1, *c.split()).stdout for c in owned}
    assert "241.1.1.1/8" in before[owned[0]]
    lab.forward(h2, *VXLAN, "-u", "172.16.2.1/16")
    p1 = lab.forward(h1, *VXLAN, "-u", "172.16.1.1/16", "bridge", "lxdst0")
    assert "lxdst0 already holds 241.1.1.1/8" in open(lab.logs[h1]).read()
    assert fan_port(h1, "lxdst0", "fan-241")
    assert ping(h1, "241.2.1.1").returncode == 0
    assert ping(h2, "241.1.1.1").returncode == 0
    # a crash, then a restart that cleans up after it: the record names no address of
    # fanpkt's, so the owner's stays
    p1.kill()
    p1.wait()
    p1 = lab.forward(h1, *VXLAN, "-u", "172.16.1.1/16", "bridge", "lxdst0")
    assert "cleaning up after an earlier run" in open(lab.logs[h1]).read()
    assert ping(h2, "241.1.1.1").returncode == 0
    assert lab.stop(p1) == 0
    assert {c: nsx(h1, *c.split()).stdout for c in owned} == before
    assert not {"fan-241", "fanvx-8472"} & link_names(h1)
    assert bridge_ports(h1, "lxdst0") == set()


# -- the wire cannot steer a fan host's bridge -------------------------------------------
SEND_STEER = """
import json, random, socket, struct, sys
from scapy.all import BOOTP, DHCP, Ether, IP, Raw, UDP, mac2str
me, h2, h2_other, local_mac = sys.argv[1:5]
vni = 15794176
rng = random.Random(21)
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
raw.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
def vx(inner, dst, src=me):
    header = struct.pack("!BBBBI", 0x08, 0, 0, 0, vni << 8)
    return bytes(IP(src=src, dst=dst) / UDP(sport=40000, dport=8472) / Raw(header) / inner)
def send(pkt):
    raw.sendto(pkt, (IP(pkt).dst, 0))
def rand_mac():
    return "02:" + ":".join(f"{rng.randrange(256):02x}" for _ in range(5))
to_c = lambda mac, src="241.9.9.2": (Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") /
                                     IP(src=src, dst="241.2.1.9", proto=253) / Raw(b"x" * 20))
for _ in range(5):      # to the underlay broadcast: one datagram reaches every host
    send(vx(to_c("02:00:00:09:09:09"), "172.16.255.255"))
for _ in range(5):      # to another address of h2's, the source forged as h1
    send(vx(to_c("02:00:00:01:01:07", "241.1.1.7"), h2_other, src="172.16.1.1"))
for i in range(300):    # DHCP requests for invented clients, unicast to the gateway
    mac = rand_mac()
    req = (Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / IP(src="241.9.9.2", dst="241.2.1.1") /
           UDP(sport=68, dport=67) / BOOTP(chaddr=mac2str(mac), xid=i) /
           DHCP(options=[("message-type", "request"), ("requested_addr", f"241.2.1.{2 + i % 250}"),
                         "end"]))
    send(vx(req, h2))
for _ in range(5):      # a local container's MAC, from the wire
    send(vx(to_c(local_mac), h2))
for _ in range(10000):  # distinct source MACs, each a frame the bridge would learn from
    send(vx(to_c(rand_mac()), h2))
print("sent")
"""


def fdb(ns, bridge="fanbr-241") -> list[dict]:
    return json.loads(nsx(ns, "bridge", "-j", "fdb", "show", "br", bridge).stdout)


def test_the_wire_cannot_steer_the_bridge(lab):
    """The hostile VXLAN cases, each counted by its reason with nothing reaching the
    bridge or its forwarding database: datagrams to the underlay broadcast and to another
    address of the host (V2, drop_rx_outer_dst), a flood of 300 DHCP requests
    (drop_rx_dhcp: the pool stays whole), a local container's MAC from the wire
    (drop_rx_local_mac: the MAC stays on its port). 10,000 frames of distinct source MACs
    are delivered (a peer's containers may have any MAC) but the TAP port learns none."""
    h1, h2 = vxlan_hosts(lab, 2, "dhcp")
    c = lab.container(h2, "c", "241.2.1.9", "241.2.1.1", bridge="fanbr-241", plen=8,
                      mtu=1450)
    local_mac = link_mac(c, "eth0")
    assert ping(c, "241.2.1.1", count=1).returncode == 0        # the bridge learns c
    assert ping(h1, "241.2.1.9", count=1).returncode == 0       # across the fan
    poll(lambda: [e for e in fdb(h2) if e["mac"] == local_mac and e.get("ifname") == "vc"],
         "the bridge did not learn the container's MAC")
    evil = lab.host("evil", "172.16.9.9")
    nsx(evil, "ip", "addr", "add", "10.99.0.2/8", "dev", "eth0")
    nsx(h2, "ip", "addr", "add", "10.99.0.1/8", "dev", "eth0")
    def tap():
        return json.loads(nsx(h2, "ip", "-s", "-j", "link", "show", "fan-241").stdout)[0][
            "stats64"]["rx"]["packets"]
    before, s0 = tap(), lab.stats(h2)
    nsx(evil, sys.executable, "-c", SEND_STEER, "172.16.9.9", "172.16.2.1", "10.99.0.1",
        local_mac, timeout=300)
    want = {"drop_rx_outer_dst": 10, "drop_rx_dhcp": 300, "drop_rx_local_mac": 5,
            "rx_packets": 10000}
    s = poll(lambda: (lambda s: s if all(s[k] - s0[k] >= v for k, v in want.items())
                      else None)(lab.stats(h2)), "the hostile datagrams were not all counted",
             timeout=60)
    # a broadcast reaches every socket of the port's SO_REUSEPORT group, one per queue
    assert s["drop_rx_outer_dst"] - s0["drop_rx_outer_dst"] == 5 + 5 * len(
        [k for k in json.loads(nsx(h2, *FANPKT, "stats", "--json").stdout)["loops"]
         if k.startswith("rx-vxlan")])
    assert s["drop_rx_dhcp"] - s0["drop_rx_dhcp"] == 300
    assert s["drop_rx_local_mac"] - s0["drop_rx_local_mac"] == 5
    # what reached the bridge is what was delivered: the 10,000 (and maybe an ARP of h1's)
    assert tap() - before == s["rx_packets"] - s0["rx_packets"] < 10000 + 5
    learnt = [e for e in fdb(h2) if e.get("ifname") == "fan-241"
              and "permanent" not in e.get("state", "")]
    assert learnt == []
    assert [e.get("ifname") for e in fdb(h2) if e["mac"] == local_mac] == ["vc"]
    ino = os.stat(f"/run/netns/{h2}").st_ino
    leases = f"/run/fanpkt/net-{ino}/dhcp-fanbr-241.leases"
    assert not os.path.exists(leases) or open(leases).read().strip() == ""
    assert ping(c, "241.2.1.1", count=1).returncode == 0         # c keeps its port
    assert ping(h1, "241.2.1.9", count=1).returncode == 0


def test_a_joined_bridges_mac_is_pinned(lab):
    """A bridge fanpkt joins (bridge NAME) whose MAC was never set follows its lowest
    port's and changes when a container joins; fanpkt pins it, so V3's own-MAC check and
    the peers' ARP caches for slice.1 stay right."""
    h1 = lab.host("h1", "172.16.1.1")
    nsx(h1, "ip", "link", "add", "lxdfan0", "type", "bridge")
    nsx(h1, "ip", "link", "set", "lxdfan0", "up")
    lab.forward(h1, *VXLAN, "-u", "172.16.1.1/16", "bridge", "lxdfan0")
    mac = link_mac(h1, "lxdfan0")
    state = f"/run/fanpkt/net-{os.stat(f'/run/netns/{h1}').st_ino}/state.json"
    assert json.load(open(state))["fans"][0]["plumbing"]["bridge_mac"] == mac
    nsx(h1, "ip", "link", "add", "vlow", "address", "00:00:00:00:00:01", "type", "veth",
        "peer", "name", "vlow1")
    nsx(h1, "ip", "link", "set", "vlow", "master", "lxdfan0", "up")
    assert link_mac(h1, "lxdfan0") == mac
