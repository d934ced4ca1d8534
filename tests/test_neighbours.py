"""Sending underlay packets as Ethernet frames to resolved neighbours: the engine's
neighbour table (Engine.set_neighbours, the transmit path) and fanpkt/neighbours.py, which
keeps it from the kernel's."""
from __future__ import annotations

import os
import random
import select
from ipaddress import IPv4Address

import pytest
from pyroute2 import IPRoute, NetNS
from pyroute2.netns import popns, pushns
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from fanpkt.fanmap import FanMap
from fanpkt.engine import MapRow, fastpath, new_counters
from fanpkt.neighbours import NeighbourWatch
from fanpkt.underlay import Interface
from lab import nsx
from packets import PAYLOAD, superpacket, vnet

TX = FanMap.parse("241.0.0.0/8", "172.16.3.4/16")
PEER = int(IPv4Address("172.16.6.7"))
MY_MAC, PEER_MAC = bytes.fromhex("02aabbccdd01"), bytes.fromhex("02aabbccdd02")
PLAIN = bytes(IP(src="241.3.4.9", dst="241.6.7.8", flags="DF") / UDP(sport=1, dport=2) /
              Raw(b"x" * 300))
NO_OFFLOAD = vnet()


def engine(ifindex=7, neighbours=((PEER, 7, PEER_MAC),)):
    eng = fastpath.Engine([MapRow.of(TX, 1500, -1, "eth0", ifindex,
                                      MY_MAC if ifindex else b"")])
    eng.set_neighbours(neighbours)
    return eng


def test_resolved_neighbour_gets_a_frame_around_the_same_packet():
    c, plain = new_counters(), new_counters()
    v, _, outs, dst = fastpath.Harness(engine(), c).transmit(NO_OFFLOAD, PLAIN)
    _, _, ref, _ = fastpath.Harness(engine(neighbours=()), plain).transmit(NO_OFFLOAD, PLAIN)
    assert v.name == "VERDICT_SEND" and dst == PEER and len(outs) == 1
    frame = Ether(outs[0])
    assert (frame.dst, frame.src, frame.type) == ("02:aa:bb:cc:dd:02", "02:aa:bb:cc:dd:01",
                                                   0x0800)
    assert bytes(frame.payload) == ref[0]       # the IP packet is the raw socket's, bit for bit
    outer = frame[IP]
    assert (outer.src, outer.dst, outer.proto) == ("172.16.3.4", "172.16.6.7", 4)
    assert IP(bytes(outer)).chksum == outer.chksum     # the kernel will not fill it in


def test_tso_segments_all_go_as_frames():
    c = new_counters()
    v, _, outs, _ = fastpath.Harness(engine(), c).transmit(vnet(1, 1, 52, 1428, 20, 16),
                                                           superpacket())
    assert v.name == "VERDICT_SEND" and len(outs) == -(-len(PAYLOAD) // 1428)
    data = b""
    for o in outs:
        frame = Ether(o)
        assert frame.dst == "02:aa:bb:cc:dd:02" and frame[IP].len == len(o) - 14
        inner = IP(bytes(frame[IP].payload))
        assert TCP(bytes(inner[TCP])).chksum == inner[TCP].chksum
        data += bytes(inner[TCP].payload)
    assert data == PAYLOAD


@pytest.mark.parametrize("ifindex,neighbours", [
    (7, ()),                                    # not resolved
    (7, ((PEER, 8, PEER_MAC),)),                # resolved on another interface
    (0, ((PEER, 7, PEER_MAC),)),                # the map's interface takes no frames
    (7, ((PEER + 1, 7, PEER_MAC),)),            # another host resolved
])
def test_otherwise_the_raw_socket_gets_the_ip_packet(ifindex, neighbours):
    harness = fastpath.Harness(engine(ifindex, neighbours), new_counters())
    v, _, outs, _ = harness.transmit(NO_OFFLOAD, PLAIN)
    assert v.name == "VERDICT_SEND" and IP(outs[0]).dst == "172.16.6.7"
    assert len(outs[0]) == len(PLAIN) + 20


def test_used_marks_report_where_frames_went_and_reset():
    eng = engine(neighbours=((PEER, 7, PEER_MAC), (PEER + 1, 7, PEER_MAC)))
    assert eng.neighbours_used() == []
    fastpath.Harness(eng, new_counters()).transmit(NO_OFFLOAD, PLAIN)
    assert eng.neighbours_used() == [PEER]
    assert eng.neighbours_used() == []


def test_large_table_finds_every_entry():
    rng = random.Random(5)
    base = int(IPv4Address("172.16.0.0"))
    hosts = rng.sample(range(base + 1, base + 0xFFFF), 5000)       # the whole underlay
    macs = {h: rng.randbytes(6) for h in hosts}
    eng = engine(neighbours=[(h, 7, macs[h]) for h in hosts])
    for h in rng.sample(hosts, 50):
        a = IPv4Address(h)
        pkt = bytes(IP(src="241.3.4.9", dst=f"241.{a.packed[2]}.{a.packed[3]}.5") /
                    UDP() / Raw(b"y"))
        v, _, outs, dst = fastpath.Harness(eng, new_counters()).transmit(NO_OFFLOAD, pkt)
        if v.name == "VERDICT_SEND":            # not this host's own slice
            assert dst == h and Ether(outs[0]).dst == ":".join(f"{b:02x}" for b in macs[h])


@pytest.mark.parametrize("bad", [(0, 7, PEER_MAC), (PEER, 0, PEER_MAC), (PEER, 7, b"\x01")])
def test_bad_entries_are_refused(bad):
    with pytest.raises(ValueError):
        fastpath.Engine().set_neighbours([bad])


# -- fanpkt/neighbours.py against a real kernel neighbour table ----------------------------

def test_watch_follows_the_kernel(lab):
    h1 = lab.host("h1", "172.16.1.1")
    h2 = lab.host("h2", "172.16.2.1")
    nsx(h1, "ping", "-c", "1", "-W", "2", "172.16.2.1")
    nsx(h1, "ip", "neigh", "add", "172.16.9.9", "lladdr", "02:00:00:00:09:09", "nud",
        "permanent", "dev", "eth0")
    nsx(h1, "ip", "neigh", "add", "172.16.8.8", "lladdr", "02:00:00:00:08:08", "nud",
        "permanent", "dev", "eth0")
    nsx(h1, "ip", "route", "add", "172.16.8.8/32", "via", "172.16.2.1")   # not on-link
    nsx(h1, "ip", "neigh", "add", "10.1.1.1", "lladdr", "02:00:00:00:01:01", "nud",
        "permanent", "dev", "eth0")                                        # outside
    nsx(h1, "ping", "-c", "1", "-W", "1", "172.16.7.7", check=False)     # FAILED
    mac2 = bytes.fromhex(nsx(h2, "cat", "/sys/class/net/eth0/address").stdout.strip()
                         .replace(":", ""))
    idx = int(nsx(h1, "cat", "/sys/class/net/eth0/ifindex").stdout)
    links = {idx: {(int(IPv4Address("172.16.0.0")), 0xFFFF0000)}}
    w = NeighbourWatch(lambda: NetNS(h1))
    try:
        mac1 = bytes.fromhex(nsx(h1, "cat", "/sys/class/net/eth0/address").stdout.strip()
                             .replace(":", ""))
        a1, a5 = int(IPv4Address("172.16.1.1")), int(IPv4Address("172.16.5.5"))
        # a1 is on eth0 (frames from its MAC); no interface holds a5, so no frames; the MTU
        # is the one each fan came up with
        was = {a1: Interface("eth0", idx, 1400, b""), a5: Interface("eth9", 99, 1500, mac2)}
        moved = w.follow(was)
        assert moved == {a1: Interface("eth0", idx, 1400, mac1),
                         a5: Interface("eth9", 99, 1500, b"")}
        assert w.follow({**was, **moved}) == {}
        entries, stale = w.scan(links)
        assert entries == {(int(IPv4Address("172.16.2.1")), idx, mac2),
                           (int(IPv4Address("172.16.9.9")), idx, bytes.fromhex("020000000909"))}
        assert stale == {}
        # STALE, as after reachable_time without confirmation (set here so as not to race
        # the kernel's own timers)
        nsx(h1, "ip", "neigh", "change", "172.16.2.1", "lladdr", mac2.hex(":"), "nud",
            "stale", "dev", "eth0")
        entries, stale = w.scan(links)
        a2 = int(IPv4Address("172.16.2.1"))
        assert stale == {a2: idx} and (a2, idx, mac2) in entries     # STALE is still sent to
        w.confirm(stale)                            # the kernel probes and confirms it
        state = nsx(h1, "ip", "neigh", "show", "172.16.2.1", "dev", "eth0").stdout
        assert "DELAY" in state or "PROBE" in state or "REACHABLE" in state, state
    finally:
        w.close()


def test_doorbells_ring_on_neighbour_and_route_changes(lab):
    h1 = lab.host("h1", "172.16.1.1")
    w = NeighbourWatch(lambda: NetNS(h1))
    pushns(h1)              # the doorbells listen in the namespace they are made in
    try:
        bells = w.subscribe()
    finally:
        popns()
    neigh, route = bells
    try:
        w.changed(select.select(bells, [], [], 0.2)[0])    # whatever the lab announced
        w.routes[1] = (True, float("inf"))
        nsx(h1, "ip", "neigh", "add", "172.16.9.9", "lladdr", "02:00:00:00:09:09", "nud",
            "permanent", "dev", "eth0")
        ready = select.select(bells, [], [], 5)[0]
        assert ready == [neigh] and w.changed(ready)
        assert w.routes                     # a neighbour change keeps the route verdicts
        assert not w.changed(bells)         # and the doorbell is empty again
        nsx(h1, "ip", "route", "add", "172.16.200.0/24", "via", "172.16.9.9")
        ready = select.select(bells, [], [], 5)[0]
        assert route in ready and w.changed(ready)
        assert not w.routes                 # a route change drops them all
    finally:
        w.close()



def test_refreshes_hold_no_netlink_socket(lab):
    """A refresh a second for months: each opens its netlink socket and closes it, and
    with it whatever pyroute2 queued on it. A long-lived pyroute2 0.9 socket kept the
    kernel's ACK of every `route get` and `link get` (the 30-minute soak's RSS growth)."""
    h1 = lab.host("h1", "172.16.1.1")
    lab.host("h2", "172.16.2.1")
    nsx(h1, "ping", "-c", "1", "-W", "2", "172.16.2.1")
    idx = int(nsx(h1, "cat", "/sys/class/net/eth0/ifindex").stdout)
    a1 = int(IPv4Address("172.16.1.1"))
    fans = [(FanMap.parse("241.0.0.0/8", "172.16.1.1/16"), Interface("eth0", idx, 1500, b""))]
    opened = []

    def netlink():
        opened.append(IPRoute())
        return opened[-1]

    pushns(h1)              # the sockets each refresh opens are h1's
    try:
        w = NeighbourWatch(netlink)
        fds = len(os.listdir("/proc/self/fd"))
        for _ in range(20):
            fans[0] = (fans[0][0], w.follow({a1: fans[0][1]}).get(a1, fans[0][1]))
            w.routes.clear()                # a route lookup every time, not once in 30 s
            assert len(w.table(fans, [])) == 1          # h2, resolved and on-link
        assert len(os.listdir("/proc/self/fd")) == fds
        assert len(opened) == 40            # one socket per follow() and per table()
        w.close()
    finally:
        popns()
