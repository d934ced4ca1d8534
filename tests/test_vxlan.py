"""The VXLAN fan's data path (docs/spec.md §6): frames from a TAP through the engine's
transmit path, UDP payloads through its receive checks, both against the oracle; scapy
builds the packets and parses what comes out. The wire facts held here are those of the
kernel's own fan (outer DF clear, TTL 64, UDP port 8472, VNI = overlay >> 8, flags 0x08,
a valid UDP checksum, an ephemeral source port from the inner flow)."""
from __future__ import annotations

import os
import random
import struct

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, defragment
from scapy.layers.l2 import ARP, Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

from fanpkt.fanmap import FanMap

from engine_impl import VxlanEngineImpl
from oracle import VxlanOracle, source_port, with_checksum
from packets import a, mutate

VNI = 0xF10000                      # LXD's default for 241.0.0.0/8: overlay >> 8
TX_MAPS = [FanMap.parse("241.0.0.0/8", "172.16.3.4/16"),
           FanMap.parse("100.64.0.0/10", "172.16.3.4/20")]
RX_MAPS = [FanMap.parse("241.0.0.0/8", "172.16.6.7/16"),
           FanMap.parse("100.64.0.0/10", "172.16.6.7/20")]
VNIS = [VNI, 0x644000]
MY_MAC, PEER_MAC = "02:f1:ac:10:06:07", "02:f1:ac:10:03:04"


@pytest.fixture(params=["oracle", "engine"])
def vx(request):
    """(sender, receiver) of one implementation: every test runs against both."""
    cls = {"oracle": VxlanOracle, "engine": VxlanEngineImpl}[request.param]
    return (cls(TX_MAPS, VNIS, dev_mac=bytes.fromhex(PEER_MAC.replace(":", ""))),
            cls(RX_MAPS, VNIS, dev_mac=bytes.fromhex(MY_MAC.replace(":", ""))))


def frame(payload=None, mac_src=PEER_MAC, mac_dst=MY_MAC, **ip) -> bytes:
    ip = {"src": "241.3.4.9", "dst": "241.6.7.8", **ip}
    if payload is None:
        payload = ICMP(id=7) / Raw(b"p" * 56)
    return bytes(Ether(src=mac_src, dst=mac_dst) / IP(**ip) / payload)


def arp(op=1, psrc="241.3.4.1", pdst="241.6.7.8", src=PEER_MAC) -> bytes:
    return bytes(Ether(src=src, dst="ff:ff:ff:ff:ff:ff" if op == 1 else MY_MAC) /
                 ARP(op=op, hwsrc=src, psrc=psrc, pdst=pdst))


def test_encap_is_the_kernels_wire_format(vx):
    tx, _ = vx
    f = frame(tos=0xB8 | 3, ttl=17, flags="DF")
    verdict, reason, out, dst = tx.encap(f)
    assert (verdict, reason, dst) == ("VERDICT_SEND", None, a("172.16.6.7"))
    p = IP(out)
    assert (p.src, p.dst, p.proto, p.ttl, p.flags, p.frag) == \
        ("172.16.3.4", "172.16.6.7", 17, 64, 0, 0)      # TTL 64 and DF clear, not inherited
    assert p.tos == 2                                   # DSCP 0; inner CE -> ECT(0)
    assert p.len == len(out) == len(f) + 50 - 14 and p.id != 0
    u = p[UDP]
    assert u.dport == 8472 and 32768 <= u.sport <= 60999 and u.len == len(f) + 16
    assert bytes(u.payload)[:8] == bytes.fromhex("08000000f1000000")
    assert p[VXLAN].vni == VNI and bytes(p[VXLAN].payload) == f
    rebuilt = IP(bytes(p))
    del rebuilt.chksum, rebuilt[UDP].chksum
    rebuilt = IP(bytes(rebuilt))
    assert (rebuilt.chksum, rebuilt[UDP].chksum) == (p.chksum, u.chksum) and u.chksum


def test_arp_goes_to_the_owner_of_the_target(vx):
    tx, _ = vx
    for pdst, host in (("241.6.7.8", "172.16.6.7"), ("241.9.1.200", "172.16.9.1"),
                       ("100.71.91.200", "172.16.1.214")):
        verdict, _, out, dst = tx.encap(arp(pdst=pdst))
        assert verdict == "VERDICT_SEND" and IP(out).dst == host == \
            str(IP(out).dst), (pdst, host)
        assert IP(out)[VXLAN].vni == (VNI if pdst.startswith("241") else 0x644000)
        assert IP(out)[ARP].pdst == pdst and len(IP(out)) == 42 + 50 - 14   # no padding


@pytest.mark.parametrize("f,reason", [
    (bytes(Ether(type=0x86DD) / Raw(b"\x60" + bytes(60))), "DROP_TX_ETHERTYPE"),
    (bytes(Ether(type=0x88CC) / Raw(bytes(40))), "DROP_TX_ETHERTYPE"),
    (bytes(12), "DROP_TX_MALFORMED"),
    (bytes(Ether(type=0x0800) / Raw(b"\x45" + bytes(10))), "DROP_TX_MALFORMED"),
    (bytes(Ether(type=0x0806) / Raw(bytes(20))), "DROP_TX_MALFORMED"),
    (frame(mac_dst="ff:ff:ff:ff:ff:ff", dst="255.255.255.255"), "DROP_TX_NO_MAP"),
    (frame(dst="241.3.4.77"), "DROP_TX_TO_SELF"),            # a local container
    (arp(pdst="241.3.4.77"), "DROP_TX_TO_SELF"),
    (frame(dst="241.255.255.9"), "DROP_TX_UNROUTABLE"),
    (frame(dst="241.6.7.255"), "DROP_TX_UNROUTABLE"),         # a slice's broadcast
    (arp(pdst="241.6.7.0"), "DROP_TX_UNROUTABLE"),            # ... and network (§2)
], ids=["ipv6", "lldp", "short", "short-ipv4", "short-arp", "broadcast", "to-self",
        "arp-to-self", "unroutable", "slice-broadcast", "arp-slice-network"])
def test_transmit_drops(vx, f, reason):
    tx, _ = vx
    assert tx.encap(f)[:2] == ("VERDICT_DROP", reason)


def test_round_trip_and_ecn(vx):
    tx, rx = vx
    for otos, itos, want in ((0, 0, 0), (3, 2, 3), (1, 2, 1), (2, 0, 0)):
        f = frame(tos=itos)
        _, _, out, _ = tx.encap(f)
        verdict, reason, got, idx = rx.decap(bytes(IP(out)[UDP].payload), a("172.16.3.4"),
                                             otos)
        assert (verdict, reason, idx) == ("VERDICT_DELIVER", None, 1)  # /8 after the /10
        inner = Ether(got)[IP]
        assert inner.tos & 3 == want and IP(bytes(inner)).chksum == inner.chksum
        if want == itos:
            assert got == f
    assert rx.decap(bytes(IP(tx.encap(frame())[2])[UDP].payload), a("172.16.3.4"), 3)[:2] \
        == ("VERDICT_DROP", "DROP_RX_ECN_CE_NOT_ECT")   # outer CE over Not-ECT


def payload(f: bytes, vni=VNI, flags=0x08, reserved=0) -> bytes:
    return struct.pack("!BBBBI", flags, 0, 0, 0, vni << 8 | reserved) + f


@pytest.mark.parametrize("data,osrc,reason", [
    (payload(frame())[:21], "172.16.3.4", "DROP_RX_TRUNCATED"),
    (payload(frame(), vni=1), "172.16.3.4", "DROP_RX_UNKNOWN_VNI"),
    (payload(frame(), flags=0x00), "172.16.3.4", "DROP_RX_BAD_VXLAN"),
    (payload(frame(), flags=0x0C), "172.16.3.4", "DROP_RX_BAD_VXLAN"),
    (payload(frame(), reserved=1), "172.16.3.4", "DROP_RX_BAD_VXLAN"),
    (payload(frame()), "10.1.2.3", "DROP_RX_SRC_NOT_UNDERLAY"),
    (payload(frame(src="241.9.9.9")), "172.16.3.4", "DROP_RX_SPOOFED_SRC"),
    (payload(arp(psrc="241.9.9.1")), "172.16.3.4", "DROP_RX_SPOOFED_SRC"),
    (payload(frame(mac_src=MY_MAC)), "172.16.3.4", "DROP_RX_OWN_MAC"),
    (payload(bytes(Ether(src=PEER_MAC, type=0x86DD) / Raw(bytes(60)))), "172.16.3.4",
     "DROP_RX_BAD_INNER"),
    (payload(frame()[:30]), "172.16.3.4", "DROP_RX_BAD_INNER"),
    (payload(frame(dst="241.6.8.8")), "172.16.3.4", "DROP_RX_NOT_LOCAL"),
    (payload(arp(pdst="241.6.8.8")), "172.16.3.4", "DROP_RX_NOT_LOCAL"),
    (payload(frame(dst="241.6.7.255")), "172.16.3.4", "DROP_RX_NOT_LOCAL"),
    (payload(arp(pdst="241.6.7.0")), "172.16.3.4", "DROP_RX_NOT_LOCAL"),
], ids=["truncated", "wrong-vni", "no-i-flag", "extra-flag", "reserved-bits",
        "outside-underlay", "spoofed-source", "spoofed-arp-sender", "own-mac", "ipv6",
        "cut-ipv4", "not-local", "arp-not-local", "slice-broadcast", "arp-slice-network"])
def test_hostile_input_is_dropped_and_counted(vx, data, osrc, reason):
    """Each of these reaches nothing: a counted drop by its reason."""
    _, rx = vx
    assert rx.decap(data, a(osrc))[:2] == ("VERDICT_DROP", reason)
    if isinstance(rx, VxlanEngineImpl):
        assert rx.counter(reason) == 1 and rx.counter("RX_PACKETS") == 0


def test_bad_inner_checksum_and_padding(vx):
    _, rx = vx
    bad = bytearray(frame())
    bad[14 + 10] ^= 0xFF
    assert rx.decap(payload(bytes(bad)), a("172.16.3.4"))[:2] == \
        ("VERDICT_DROP", "DROP_RX_BAD_INNER_CSUM")
    padded = arp(op=2, psrc="241.3.4.1", pdst="241.6.7.1") + bytes(18)   # a 60-byte frame
    assert rx.decap(payload(padded), a("172.16.3.4"))[:3] == \
        ("VERDICT_DELIVER", None, padded)


@pytest.mark.parametrize("odst", ["172.16.255.255", "10.99.0.1", "172.16.3.4",
                                  "255.255.255.255"],
                         ids=["underlay-broadcast", "other-local-address", "peer",
                              "limited-broadcast"])
def test_outer_destination_must_be_this_hosts_underlay_address(vx, odst):
    """V2, as IPIP's R2: the UDP socket, bound to 0.0.0.0, also takes datagrams to the
    underlay broadcast and to any other address of the host; none reaches the bridge."""
    _, rx = vx
    data = payload(frame())
    assert rx.decap(data, a("172.16.3.4"), 0, 8472, a("172.16.6.7"))[0] == "VERDICT_DELIVER"
    assert rx.decap(data, a("172.16.3.4"), 0, 8472, a(odst))[:2] == \
        ("VERDICT_DROP", "DROP_RX_OUTER_DST")


@pytest.mark.parametrize("udp,reason", [
    (UDP(sport=68, dport=67), "DROP_RX_DHCP"),                  # a client to a server
    (UDP(sport=67, dport=68), "DROP_RX_DHCP"),                  # a server to a client
    (UDP(sport=4000, dport=67), "DROP_RX_DHCP"),
    (UDP(sport=67, dport=4000), None),                          # not DHCP's ports
    (UDP(sport=68, dport=53), None),
], ids=["request", "reply", "any-source-port", "from-67", "from-68"])
def test_dhcp_never_crosses_a_fan(vx, udp, reason):
    """A peer's DHCP would reach the bridge's dnsmasq as a local container's: a pool
    exhausted from the wire. Any UDP to port 67 or 68 is dropped, counted."""
    _, rx = vx
    f = frame(udp / Raw(bytes(240)), dst="241.6.7.1")
    got = rx.decap(payload(f), a("172.16.3.4"))
    assert got[:2] == (("VERDICT_DROP", reason) if reason else ("VERDICT_DELIVER", None))
    # a non-first fragment carries no ports: it is no DHCP of its own
    frag = frame(Raw(b"\x00\x44\x00\x43" + bytes(40)), dst="241.6.7.1", proto=17, frag=8)
    assert rx.decap(payload(frag), a("172.16.3.4"))[0] == "VERDICT_DELIVER"


def test_a_local_mac_from_the_wire_is_dropped(vx):
    """A frame from the wire with a MAC of this host's side of the bridge as source is
    forged (a local container's MAC, V3): dropped, counted, never delivered."""
    _, rx = vx
    local = "0a:58:f1:06:07:09"
    f = frame(mac_src=local)
    assert rx.decap(payload(f), a("172.16.3.4"))[0] == "VERDICT_DELIVER"
    rx.local_macs = {bytes.fromhex(local.replace(":", "")), bytes(6)}
    assert rx.decap(payload(f), a("172.16.3.4"))[:2] == ("VERDICT_DROP", "DROP_RX_LOCAL_MAC")
    assert rx.decap(payload(arp(src=local, psrc="241.3.4.9")), a("172.16.3.4"))[:2] == \
        ("VERDICT_DROP", "DROP_RX_LOCAL_MAC")
    assert rx.decap(payload(frame()), a("172.16.3.4"))[0] == "VERDICT_DELIVER"
    rx.local_macs = set()
    assert rx.decap(payload(f), a("172.16.3.4"))[0] == "VERDICT_DELIVER"


def test_local_mac_set_of_many():
    """The engine's set holds thousands (a hash, probed until an empty slot)."""
    rx = VxlanEngineImpl(RX_MAPS, VNIS)
    rng = random.Random(3)
    macs = {rng.randbytes(6) for _ in range(5000)}
    rx.local_macs = macs
    with pytest.raises(ValueError):
        rx.engine.set_local_macs([bytes(5)])        # not a MAC: refused, the set stays
    for mac in list(macs)[:300]:
        m = ":".join(f"{b:02x}" for b in mac)
        assert rx.decap(payload(frame(mac_src=m)), a("172.16.3.4"))[1] == "DROP_RX_LOCAL_MAC"
    others = [rng.randbytes(6) for _ in range(300)]
    for mac in others:
        if mac not in macs:
            m = ":".join(f"{b:02x}" for b in mac)
            assert rx.decap(payload(frame(mac_src=m)), a("172.16.3.4"))[0] == \
                "VERDICT_DELIVER"


def test_spoof_check_off_accepts_any_inner_source():
    rx = VxlanEngineImpl(RX_MAPS, VNIS, check_spoof=False)
    assert rx.decap(payload(frame(src="241.9.9.9")), a("172.16.3.4"))[0] == "VERDICT_DELIVER"


def test_source_port_follows_the_flow_both_ways():
    rng = random.Random(5)
    ports = set()
    for _ in range(200):
        s, d = f"241.3.4.{rng.randrange(2, 250)}", f"241.6.7.{rng.randrange(2, 250)}"
        sp, dp = rng.randrange(1, 65536), rng.randrange(1, 65536)
        fwd = frame(UDP(sport=sp, dport=dp), mac_src=PEER_MAC, src=s, dst=d)
        back = frame(UDP(sport=dp, dport=sp), mac_src=MY_MAC, src=d, dst=s)
        port = source_port(fwd, 1)
        assert port == source_port(back, 1) and 32768 <= port <= 60999
        ports.add(port)
    assert len(ports) > 150                     # flows spread (ECMP, RSS)
    assert source_port(arp(pdst="241.6.7.8"), 1) == source_port(arp(pdst="241.9.9.9"), 1)
    eng = VxlanEngineImpl(TX_MAPS, VNIS, seed=99)
    f = frame(TCP(sport=4000, dport=80))
    assert IP(eng.encap(f)[2])[UDP].sport == source_port(f, 99)


def test_too_big_leaves_in_outer_fragments():
    """DF is clear on the outer header, as the kernel sends: a frame too big for the
    underlay leaves in fragments that reassemble to the whole packet."""
    tx = VxlanEngineImpl(TX_MAPS, VNIS, mtu=1400)
    f = frame(Raw(bytes(range(256)) * 6))
    verdict, _, outs, _ = tx.encap(f)
    assert verdict == "VERDICT_SEND" and len(outs) == 2
    whole = defragment([IP(o) for o in outs])[0]
    assert bytes(whole[VXLAN].payload) == f and tx.counter("TX_FRAGMENTED") == 1


# -- engine vs oracle ----------------------------------------------------------------------
N_FRAMES = 100_000
SEED = int(os.environ.get("FANPKT_SEED", random.randrange(1 << 32)))
ADDRS = [0xF1030409, 0xF1060708, 0xF1030401, 0xF1FFFF01, 0xF1000001, 0x64475BC8,
         0x64400001, 0x0A000001, 0xF1060701, 0xF1090909, 0xFFFFFFFF]
LOCAL_MAC = bytes.fromhex("0a58f1060709")            # a local container's, in the set
MACS = [bytes.fromhex(PEER_MAC.replace(":", "")), bytes.fromhex(MY_MAC.replace(":", "")),
        b"\xff" * 6, LOCAL_MAC]


def random_frame(rng: random.Random) -> bytes:
    eth = rng.choice(MACS) + rng.choice(MACS)
    kind = rng.random()
    if kind < 0.25:
        body = struct.pack("!HHBBH6sI6sI", 1, 0x0800, 6, 4, rng.choice([1, 2]), MACS[0],
                           rng.choice(ADDRS), MACS[1], rng.choice(ADDRS))
        return eth + b"\x08\x06" + body + bytes(rng.choice([0, 0, 18]))
    if kind < 0.3:
        return eth + rng.choice([b"\x86\xdd", b"\x88\xcc", b"\x81\x00"]) + rng.randbytes(50)
    ihl = rng.choice([5, 5, 5, 6])
    size = rng.choice([ihl * 4, 64, 300, 1400, 1450, rng.randrange(20, 1450)])
    size = max(size, ihl * 4)
    hdr = struct.pack("!BBHHHBBHII", 0x40 | ihl, rng.randrange(256), size,
                      rng.randrange(65536), rng.choice([0, 0x4000, 0x2000, 0x0010]),
                      64, rng.choice([1, 6, 17, 4]), 0, rng.choice(ADDRS), rng.choice(ADDRS))
    hdr = with_checksum(hdr + bytes(ihl * 4 - 20))
    tail = rng.randbytes(size - len(hdr))
    if len(tail) >= 4 and rng.random() < 0.1:      # DHCP's ports (UDP) or not
        tail = tail[:2] + rng.choice([b"\x00\x43", b"\x00\x44"]) + tail[4:]
    return eth + b"\x08\x00" + hdr + tail + bytes(rng.choice([0, 0, 0, 6]))


def whole(out):
    """The engine's outer fragments of one packet (a list) joined into the packet the
    oracle builds; anything else as it is."""
    if not isinstance(out, list):
        return out
    hdr, body = bytearray(out[0][:20]), b"".join(o[20:] for o in out)
    struct.pack_into("!HHH", hdr, 2, 20 + len(body), struct.unpack_from("!H", hdr, 4)[0], 0)
    return with_checksum(bytes(hdr)) + body


def test_differential_vxlan():
    """Engine vs oracle on 100,000 seeded random and mutated frames and payloads:
    identical verdicts, drop reasons and bytes (outer IP ID, source port and checksums
    included). The seed is printed; FANPKT_SEED=<n> replays a run."""
    print(f"vxlan differential seed: {SEED} (replay with FANPKT_SEED={SEED})")
    rng = random.Random(SEED)
    dev = bytes.fromhex(MY_MAC.replace(":", ""))
    tx = (VxlanOracle(TX_MAPS, VNIS, seed=7), VxlanEngineImpl(TX_MAPS, VNIS, seed=7))
    rxs = [(VxlanOracle(RX_MAPS, VNIS, dev_mac=dev, check_spoof=c),
            VxlanEngineImpl(RX_MAPS, VNIS, dev_mac=dev, check_spoof=c)) for c in (True, False)]
    for pair in rxs:
        for impl in pair:
            impl.local_macs = {LOCAL_MAC}
    seen: dict = {}
    for n in range(N_FRAMES):
        f = random_frame(rng)
        if rng.random() < 0.3:
            f = mutate(rng, f, 50)
        if n % 2:
            o, e = tx[0].encap(f), tx[1].encap(f)
            e = (*e[:2], whole(e[2]), e[3])
        else:
            data = struct.pack("!BBBBI", 8, 0, 0, 0, rng.choice(VNIS + [1]) << 8) + f
            if rng.random() < 0.2:
                data = mutate(rng, data, 50)
            osrc = rng.choice([0xAC100304, 0xAC100607, 0x0A000001, 0xAC090909])
            otos = rng.randrange(4)
            odst = rng.choice([0xAC100607] * 8 + [0xAC10FFFF, 0x0A630001])
            ro, re = rxs[rng.random() < 0.2]
            o, e = ro.decap(data, osrc, otos, 8472, odst), re.decap(data, osrc, otos, 8472, odst)
        assert e == o, f"frame {n} differs (seed {SEED}): {f.hex()}"
        seen[o[:2]] = seen.get(o[:2], 0) + 1
    reasons = {k[1] for k in seen if k[1]}
    assert {"VERDICT_SEND", "VERDICT_DELIVER"} <= {k[0] for k in seen}
    assert reasons == {
        "DROP_TX_MALFORMED", "DROP_TX_ETHERTYPE", "DROP_TX_NO_MAP", "DROP_TX_UNROUTABLE",
        "DROP_TX_TO_SELF", "DROP_RX_TRUNCATED", "DROP_RX_BAD_VXLAN", "DROP_RX_UNKNOWN_VNI",
        "DROP_RX_SRC_NOT_UNDERLAY", "DROP_RX_BAD_INNER", "DROP_RX_BAD_INNER_CSUM",
        "DROP_RX_OWN_MAC", "DROP_RX_NOT_LOCAL", "DROP_RX_SPOOFED_SRC",
        "DROP_RX_ECN_CE_NOT_ECT", "DROP_RX_OUTER_DST", "DROP_RX_LOCAL_MAC",
        "DROP_RX_DHCP"}, sorted(reasons)


# -- offloads: the GSO and GRO paths against their unsegmented equivalents -----------------
import socket  # noqa: E402

from fanpkt.engine import MapRow, fastpath, new_counters  # noqa: E402
from packets import PAYLOAD, vnet  # noqa: E402

PEER = a("172.16.6.7")
TX_MAC, RX_MAC = bytes.fromhex("02f1ac100304"), bytes.fromhex("02f1ac100607")
IFINDEX = 7


def tso_frame(payload=PAYLOAD, flags="PA") -> bytes:
    return bytes(Ether(src=PEER_MAC, dst=MY_MAC) /
                 IP(src="241.3.4.9", dst="241.6.7.8", flags="DF", id=50, tos=2) /
                 TCP(sport=4000, dport=5201, seq=1000, ack=7, flags=flags,
                     options=[("Timestamp", (1, 2))]) / Raw(payload))


def tx_engine(resolved: bool):
    eng = fastpath.Engine([MapRow.of(TX_MAPS[0], 1500, -1, "eth0", IFINDEX, TX_MAC,
                                     kind="vxlan", vni=VNI, port=8472,
                                     dev_mac=bytes.fromhex(PEER_MAC.replace(":", "")))],
                          seed=3)
    eng.set_neighbours([(PEER, IFINDEX, RX_MAC)] if resolved else [])
    return eng


def kernel_udp_gso(msg: bytes) -> list[bytes]:
    """What the kernel makes of a UDP GSO superpacket handed to a packet socket with a
    virtio header (__udp_gso_segment): one outer IPv4/UDP packet per gso_size bytes of
    UDP payload, IDs counting up, lengths and both checksums recomputed."""
    flags, gso_type, hdr_len, gso_size, start, offset = struct.unpack_from("=BBHHHH", msg)
    frame = Ether(msg[10:])
    assert (flags, start, offset) == (1, 34, 6) and frame.type == 0x0800
    outer = bytes(frame.payload)
    ip_hdr, udp_hdr, body = outer[:20], outer[20:28], outer[28:]
    size = gso_size if gso_type == 5 else len(body)
    assert gso_type in (0, 5) and len(body) == struct.unpack_from("!H", udp_hdr, 4)[0] - 8
    ident = struct.unpack_from("!H", ip_hdr, 4)[0]
    out = []
    for k, i in enumerate(range(0, len(body), size)):
        piece = body[i:i + size]
        p = IP(ip_hdr + udp_hdr + piece)
        p.len, p.id, p[UDP].len = 28 + len(piece), (ident + k) & 0xFFFF, 8 + len(piece)
        del p.chksum, p[UDP].chksum
        out.append(bytes(p))
    return out


def test_gso_matches_the_per_segment_path():
    """A TSO superpacket from the TAP: to a resolved neighbour it leaves as UDP GSO
    superpackets; cut the way the kernel cuts them, they are byte for byte the packets
    the per-segment path sends to an unresolved one (same IDs, ports, checksums)."""
    vh = vnet(1, 1, 66, 1398, 34, 16)
    per_seg = fastpath.Harness(tx_engine(False), new_counters())
    v, _, outs, _ = per_seg.transmit(vh, tso_frame(), vxlan=True)
    assert v.name == "VERDICT_SEND" and len(outs) == -(-len(PAYLOAD) // 1398)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        c = new_counters()
        gso = fastpath.Harness(tx_engine(True), c)
        v2, _, lanes, _ = gso.transmit(vh, tso_frame(), vxlan=True, gso_fd=mine.fileno())
        theirs.setblocking(False)
        msgs = []
        while True:
            try:
                msgs.append(theirs.recv(1 << 17))
            except BlockingIOError:
                break
    finally:
        mine.close()
        theirs.close()
    assert v2.name == "VERDICT_SEND" and lanes == [] and len(msgs) == 1
    assert Ether(msgs[0][10:]).dst == "02:f1:ac:10:06:07"         # the neighbour's MAC
    assert kernel_udp_gso(msgs[0]) == outs
    names = fastpath.counter_names()
    assert c[names.index("tx_gso")] == 1 and c[names.index("tx_packets")] == len(outs)
    data = b""
    for o in outs:                  # each segment a valid TCP packet of the flow
        inner = IP(o)[VXLAN][IP]
        again = IP(bytes(inner))
        del again.chksum, again[TCP].chksum
        again = IP(bytes(again))
        assert (again.chksum, again[TCP].chksum) == (inner.chksum, inner[TCP].chksum)
        assert IP(o).tos == 2 and IP(o)[UDP].sport == IP(outs[0])[UDP].sport
        data += bytes(inner[TCP].payload)
    assert data == PAYLOAD


def test_gso_superpackets_stay_under_the_ip_limit():
    """A 64 KiB TSO frame needs more than one UDP GSO send (an IPv4 packet is < 64 KiB)."""
    payload = bytes(range(256)) * 250                              # 64000 bytes
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        gso = fastpath.Harness(tx_engine(True), new_counters())
        gso.transmit(vnet(1, 1, 66, 1398, 34, 16), tso_frame(payload), vxlan=True,
                     gso_fd=mine.fileno())
        theirs.setblocking(False)
        pieces = []
        while True:
            try:
                pieces += kernel_udp_gso(theirs.recv(1 << 17))
            except BlockingIOError:
                break
    finally:
        mine.close()
        theirs.close()
    assert len(pieces) == -(-len(payload) // 1398) and all(len(p) <= 1500 for p in pieces)
    assert b"".join(bytes(IP(p)[VXLAN][TCP].payload) for p in pieces) == payload



# Runs: plain frames of one flow, read in one burst, leave in one UDP GSO send
def udp_read(n: int, sport=4000, size=64, tos=0) -> bytes:
    """A TAP read: no offload, a UDP datagram of flow `sport` with payload size `size`."""
    return vnet() + frame(UDP(sport=sport, dport=5201) / Raw(bytes([n & 0xFF]) * size),
                          id=n, tos=tos)


def burst(reads, all_sent=True):
    """The reads as one batch of a transmit loop to a resolved neighbour: what it sent,
    in order, as ("gso", [outer IP packets, cut as the kernel cuts them]) or ("frame",
    outer IP packet), and the counters. all_sent: every read must be sent."""
    c = new_counters()
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        verdicts = fastpath.Harness(tx_engine(True), c).transmit_burst(reads, mine.fileno())
        assert not all_sent or {v.name for v in verdicts} == {"VERDICT_SEND"}
        theirs.setblocking(False)
        sent = []
        while True:
            try:
                msg = theirs.recv(1 << 17)
            except BlockingIOError:
                break
            # a GSO send starts with its virtio header (flags NEEDS_CSUM = 1), a frame
            # with the neighbour's MAC (02:...)
            sent.append(("gso", kernel_udp_gso(msg)) if msg[0] == 1
                        else ("frame", bytes(Ether(msg).payload)))
    finally:
        mine.close()
        theirs.close()
    return sent, dict(zip(fastpath.counter_names(), c))


def one_by_one(reads) -> list[bytes]:
    """The same reads through the per-frame path, one read per batch: the reference."""
    h = fastpath.Harness(tx_engine(True), new_counters())
    out = []
    for r in reads:
        v, _, outs, _ = h.transmit(r[:10], r[10:], vxlan=True)
        assert v.name == "VERDICT_SEND" and len(outs) == 1
        out.append(bytes(Ether(outs[0]).payload))
    return out


def shape(sent) -> list:
    return [(kind, len(x)) if kind == "gso" else kind for kind, x in sent]


def flat(sent) -> list[bytes]:
    return [p for kind, x in sent for p in (x if kind == "gso" else [x])]


def test_a_burst_of_one_flow_leaves_in_one_udp_gso_send():
    """Twenty datagrams of one flow: one send, which the kernel cuts into exactly the
    packets the per-frame path sends (IDs, source port, checksums, byte for byte)."""
    reads = [udp_read(i) for i in range(20)]
    sent, c = burst(reads)
    assert shape(sent) == [("gso", 20)]
    assert flat(sent) == one_by_one(reads)
    assert (c["tx_gso"], c["tx_gso_joined"], c["tx_packets"], c["tx_l2"]) == (1, 20, 20, 20)
    assert c["tx_bytes"] == sum(len(p) for p in flat(sent))


@pytest.mark.parametrize("sizes, expect", [
    # a shorter frame ends the run it joins; the next begins another
    ([40] * 5 + [10] + [40] * 3, [("gso", 6), ("gso", 3)]),
    # a longer one cannot join: it begins its own run; a single frame leaves as it is
    ([10] * 3 + [40, 10, 10], [("gso", 3), ("gso", 2), "frame"]),
], ids=["shorter-ends", "longer-begins"])
def test_a_run_is_one_size_but_its_last(sizes, expect):
    reads = [udp_read(i, size=n) for i, n in enumerate(sizes)]
    sent, c = burst(reads)
    assert shape(sent) == expect
    assert flat(sent) == one_by_one(reads)
    assert c["tx_gso_joined"] == sum(n for kind, n in (e for e in expect if e != "frame"))


def test_other_flows_end_a_run_and_every_flow_stays_in_order():
    """A1 B1 B2 B3 A2 A3: A1 leaves before B's run, B's run before A2 and A3; taking
    turns (A B A B) no run forms at all, and nothing is lost or reordered."""
    a_, b_ = (lambda i: udp_read(i, sport=4000)), (lambda i: udp_read(i, sport=4001))
    assert IP(one_by_one([a_(0)])[0])[UDP].sport != IP(one_by_one([b_(0)])[0])[UDP].sport
    reads = [a_(0), b_(1), b_(2), b_(3), a_(4), a_(5)]
    sent, _ = burst(reads)
    assert shape(sent) == ["frame", ("gso", 3), ("gso", 2)]
    assert flat(sent) == one_by_one(reads)
    reads = [a_(0), b_(1), a_(2), b_(3)]
    sent, c = burst(reads)
    assert shape(sent) == ["frame"] * 4 and c["tx_gso"] == 0
    assert flat(sent) == one_by_one(reads)


def test_an_ecn_mark_ends_a_run():
    """The outer TOS carries each frame's ECN (RFC 6040): one GSO send has one TOS."""
    reads = [udp_read(0, tos=2), udp_read(1, tos=2), udp_read(2, tos=1), udp_read(3, tos=2)]
    sent, _ = burst(reads)
    assert shape(sent) == [("gso", 2), "frame", "frame"]
    assert [IP(p).tos for p in flat(sent)] == [2, 2, 1, 2]
    assert flat(sent) == one_by_one(reads)
    # CE leaves as ECT(0), as T3 says: the same outer TOS, so it joins
    sent, _ = burst([udp_read(0, tos=2), udp_read(1, tos=3), udp_read(2, tos=2)])
    assert shape(sent) == [("gso", 3)]


def test_random_bursts_leave_exactly_as_frame_by_frame():
    """Property: whatever a burst holds (flows, sizes, ECN, ARP, a TSO superpacket, a
    frame to drop), what the runs send, cut as the kernel cuts it, is packet for packet
    what the per-frame path sends, in the same order."""
    rng = random.Random(1729)
    tso = vnet(1, 1, 66, 1398, 34, 16) + tso_frame(PAYLOAD[:5000])
    for _ in range(150):
        reads = []
        for i in range(rng.randrange(1, 40)):
            r = rng.random()
            if r < 0.05:
                reads.append(tso)
            elif r < 0.1:
                reads.append(vnet() + arp())
            elif r < 0.13:
                reads.append(vnet() + frame(dst="241.3.4.20"))      # to this host: dropped
            else:
                reads.append(udp_read(i, sport=rng.choice([4000, 4001, 4002]),
                                      size=rng.choice([20, 20, 20, 64, 1000]),
                                      tos=rng.choice([0, 0, 0, 2, 3])))
        sent, c = burst(reads, all_sent=False)
        got = flat(sent)
        want = []
        h = fastpath.Harness(tx_engine(True), new_counters())
        for r in reads:
            v, _, outs, _ = h.transmit(r[:10], r[10:], vxlan=True)
            want += [bytes(Ether(o).payload) for o in outs]
        assert got == want
        assert c["tx_packets"] == len(want)

def test_a_run_stays_under_the_ip_limit():
    """64 frames of 1,400 bytes are 90 KB: two sends, each an IPv4 packet under 64 KiB."""
    reads = [udp_read(i, size=1350) for i in range(64)]
    sent, c = burst(reads)
    per = (0xFFFF - 28) // (len(reads[0]) - 10 + 8)     # VXLAN header + frame a segment
    assert shape(sent) == [("gso", per), ("gso", 64 - per)]
    assert flat(sent) == one_by_one(reads) and c["tx_gso_joined"] == 64

@pytest.mark.parametrize("resolved", [False, True], ids=["unresolved", "resolved"])
def test_tso_segments_too_big_for_the_underlay_leave_in_fragments(resolved):
    """A superpacket whose MSS the TAP's MTU does not allow (a container with MTU 9000 on
    the bridge): each segment leaves in outer fragments within the MTU, as the kernel's
    vxlan sends it with DF clear, and reassembles into that segment exactly."""
    payload = bytes(range(256)) * 80                               # 20480 bytes
    c = new_counters()
    h = fastpath.Harness(tx_engine(resolved), c)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:        # no UDP GSO for it, even to a resolved neighbour: its segments do not fit
        v, _, outs, _ = h.transmit(vnet(1, 1, 66, 8948, 34, 16), tso_frame(payload),
                                   vxlan=True, gso_fd=mine.fileno())
        assert written(theirs) == []
    finally:
        mine.close()
        theirs.close()
    if resolved:            # frames to the neighbour's MAC
        assert all(Ether(o).dst == "02:f1:ac:10:06:07" for o in outs)
        outs = [bytes(Ether(o).payload) for o in outs]
    segments = -(-len(payload) // 8948)
    names = fastpath.counter_names()
    assert v.name == "VERDICT_SEND" and c[names.index("tx_fragmented")] == segments
    assert all(len(o) <= 1500 and IP(o).flags.DF == 0 for o in outs)
    whole = defragment([IP(o) for o in outs])
    assert len(whole) == segments
    data = b""
    for seq, p in sorted((p[TCP].seq, p) for p in whole):
        inner = p[VXLAN][IP]
        again = IP(bytes(inner))
        del again.chksum, again[TCP].chksum
        assert IP(bytes(again))[TCP].chksum == inner[TCP].chksum       # a valid segment
        outer = IP(bytes(p))
        del outer[UDP].chksum
        assert IP(bytes(outer))[UDP].chksum == p[UDP].chksum            # and outer datagram
        data += bytes(inner[TCP].payload)
    assert data == payload


def test_tso_segments_on_a_tiny_underlay_mtu_are_dropped():
    """At an underlay MTU of 100 not even a segment's headers (102 bytes) fit a first
    fragment."""
    c = new_counters()
    eng = fastpath.Engine([MapRow.of(TX_MAPS[0], 100, -1, kind="vxlan", vni=VNI,
                                     port=8472,
                                     dev_mac=bytes.fromhex(PEER_MAC.replace(":", "")))])
    v, reason, outs, _ = fastpath.Harness(eng, c).transmit(
        vnet(1, 1, 66, 1398, 34, 16), tso_frame(), vxlan=True)
    assert (v.name, fastpath.counter_names()[reason], outs) == \
        ("VERDICT_DROP", "drop_tx_too_big", [])


def rx_engine(tap_fd):
    return fastpath.Engine([MapRow.of(RX_MAPS[0], 1500, tap_fd, kind="vxlan", vni=VNI,
                                      port=8472, dev_mac=RX_MAC)])


def written(sock) -> list[bytes]:
    sock.setblocking(False)
    out = []
    while True:
        try:
            out.append(sock.recv(1 << 17))
        except BlockingIOError:
            return out


@pytest.mark.parametrize("coalesced", [False, True], ids=["one-by-one", "udp-gro"])
def test_gro_coalesces_segments_into_one_tap_write(coalesced):
    """The per-segment packets of a superpacket, received one by one or as the kernel's
    UDP GRO hands them over (one buffer): one TAP write of one TCP superpacket, whose
    payload is the original and which splits back into the same segments."""
    per_seg = fastpath.Harness(tx_engine(False), new_counters())
    _, _, outs, _ = per_seg.transmit(vnet(1, 1, 66, 1398, 34, 16), tso_frame(), vxlan=True)
    payloads = [bytes(IP(o)[UDP].payload) for o in outs]
    tap, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        c = new_counters()
        rx = fastpath.Harness(rx_engine(tap.fileno()), c)
        src = a("172.16.3.4")
        if coalesced:
            rx.vxlan_receive([(b"".join(payloads), len(payloads[0]), src, 0)])
        else:
            rx.vxlan_receive([(p, 0, src, 0) for p in payloads])
        writes = written(reader)
    finally:
        tap.close()
        reader.close()
    assert len(writes) == 1
    flags, gso_type, hdr_len, gso_size, start, offset = struct.unpack_from("=BBHHHH", writes[0])
    assert (flags, gso_type, gso_size, start, offset) == (1, 1, 1398, 34, 16)
    frame = Ether(writes[0][10:])
    assert (frame.src, frame.dst) == (PEER_MAC, MY_MAC)
    assert frame[IP].len == len(writes[0]) - 24 and bytes(frame[TCP].payload) == PAYLOAD
    names = fastpath.counter_names()
    assert c[names.index("rx_packets")] == len(outs)
    assert c[names.index("rx_gro_merged")] == len(outs) - 1
    assert c[names.index("rx_udp_gro")] == (len(outs) if coalesced else 0)
    again = fastpath.Harness(tx_engine(False), new_counters())
    _, _, resplit, _ = again.transmit(writes[0][:10], writes[0][10:], vxlan=True)
    assert [bytes(IP(o)[UDP].payload) for o in resplit] == payloads


@pytest.mark.parametrize("coalesced", [False, True], ids=["one-by-one", "udp-gro"])
def test_udp_frames_coalesce_into_one_udp_gso_tap_write(coalesced):
    """Frames of consecutive UDP datagrams of one flow (the last shorter): one TAP write
    of one UDP GSO superpacket (VNET_GSO_UDP_L4) that the kernel splits back into the same
    datagrams, and 64 at most to a write (a UDP GRO buffer may bring more)."""
    sizes = [100] * 70 + [60]
    frames = [frame(UDP(sport=4000, dport=7007) / Raw(bytes((i + k) & 0xFF for k in range(n))),
                    flags="DF", id=i) for i, n in enumerate(sizes)]
    per = fastpath.Harness(tx_engine(False), new_counters())
    payloads = [bytes(IP(per.transmit(bytes(10), f, vxlan=True)[2][0])[UDP].payload)
                for f in frames]
    tap, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        c = new_counters()
        rx = fastpath.Harness(rx_engine(tap.fileno()), c)
        src = a("172.16.3.4")
        if coalesced:       # the kernel's UDP GRO: datagrams of one size, the last shorter
            size = len(payloads[0])
            rx.vxlan_receive([(b"".join(payloads[:64]), size, src, 0),
                              (b"".join(payloads[64:]), size, src, 0)])
        else:
            rx.vxlan_receive([(p, 0, src, 0) for p in payloads[:64]])
            rx.vxlan_receive([(p, 0, src, 0) for p in payloads[64:]])
        writes = written(reader)
    finally:
        tap.close()
        reader.close()
    got = []
    for w in writes:
        flags, gso_type, hdr_len, gso_size, start, offset = struct.unpack_from("=BBHHHH", w)
        assert (flags, gso_type, hdr_len, gso_size, start, offset) == (1, 5, 42, 100, 34, 6)
        f = Ether(w[10:])
        assert (f.src, f.dst) == (PEER_MAC, MY_MAC) and f[IP].len == len(w) - 24
        pay = bytes(f[UDP].payload)
        got += [(f[IP].src, f[IP].dst, f[UDP].sport, pay[i:i + 100])
                for i in range(0, len(pay), 100)]
    assert len(writes) == 2 and len(got) == len(frames)            # 64, then 7
    assert got == [(p[IP].src, p[IP].dst, p[UDP].sport, bytes(p[UDP].payload))
                   for p in map(Ether, frames)]
    names = fastpath.counter_names()
    assert c[names.index("rx_packets")] == len(frames)
    assert c[names.index("rx_gro_merged")] == len(frames) - 2


def test_gro_keeps_other_frames_and_order():
    """Frames that may not join (ARP, a corrupt segment, another flow) are written on
    their own, in the order they came; nothing is lost."""
    per_seg = fastpath.Harness(tx_engine(False), new_counters())
    _, _, outs, _ = per_seg.transmit(vnet(1, 1, 66, 1398, 34, 16),
                                     tso_frame(PAYLOAD[:1398 * 4], flags="A"), vxlan=True)
    payloads = [bytes(IP(o)[UDP].payload) for o in outs]
    bad = bytearray(payloads[2])
    bad[-1] ^= 0xFF
    arp_payload = struct.pack("!BBBBI", 8, 0, 0, 0, VNI << 8) + \
        arp(op=2, psrc="241.3.4.9", pdst="241.6.7.1")
    seq = [payloads[0], payloads[1], bytes(bad), arp_payload, payloads[3]]
    tap, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        rx = fastpath.Harness(rx_engine(tap.fileno()), new_counters())
        rx.vxlan_receive([(p, 0, a("172.16.3.4"), 0) for p in seq])
        writes = written(reader)
    finally:
        tap.close()
        reader.close()
    kinds = [(Ether(w[10:]).type, len(Ether(w[10:])[TCP].payload) if TCP in Ether(w[10:])
              else 0) for w in writes]
    assert kinds == [(0x0800, 2 * 1398), (0x0800, 1398), (0x0806, 0), (0x0800, 1398)]


def test_gro_never_joins_frames_of_other_macs():
    """Same TCP flow, another source MAC (a moved or spoofing container): never merged,
    since the superpacket is written with the first segment's Ethernet header."""
    per_seg = fastpath.Harness(tx_engine(False), new_counters())
    _, _, outs, _ = per_seg.transmit(vnet(1, 1, 66, 1398, 34, 16),
                                     tso_frame(PAYLOAD[:1398 * 2], flags="A"), vxlan=True)
    p0, p1 = (bytearray(bytes(IP(o)[UDP].payload)) for o in outs)
    p1[8 + 6:8 + 12] = bytes.fromhex("02f1ac100399")                # inner source MAC
    tap, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        rx = fastpath.Harness(rx_engine(tap.fileno()), new_counters())
        rx.vxlan_receive([(bytes(p), 0, a("172.16.3.4"), 0) for p in (p0, p1)])
        writes = written(reader)
    finally:
        tap.close()
        reader.close()
    assert [Ether(w[10:]).src for w in writes] == [PEER_MAC, "02:f1:ac:10:03:99"]


def test_an_empty_datagram_is_a_counted_drop():
    """A zero-length UDP datagram on the VXLAN port is one datagram like any other: V1
    counts it (drop_rx_truncated), nothing reaches the TAP. (Found by tests/fuzz.py: the
    receive loop skipped it uncounted.)"""
    tap, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        c = new_counters()
        rx = fastpath.Harness(rx_engine(tap.fileno()), c)
        rx.vxlan_receive([(b"", 0, a("172.16.3.4"), 0)])
        assert written(reader) == []
    finally:
        tap.close()
        reader.close()
    names = fastpath.counter_names()
    assert c[names.index("drop_rx_truncated")] == 1 and c[names.index("rx_packets")] == 0
