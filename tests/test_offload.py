"""TUN offloads (_fast/offload.pxd): TSO superpackets split into segments on transmit,
segments coalesced on receive, checked with scapy."""
from __future__ import annotations

import struct

import pytest

from scapy.layers.inet import IP, TCP, IPOption_RR
from scapy.packet import Raw

from fanpkt.fanmap import FanMap
from fanpkt.engine import MapRow, fastpath, new_counters
from packets import PAYLOAD, superpacket, vnet

TX = FanMap.parse("241.0.0.0/8", "172.16.3.4/16")
RX = FanMap.parse("241.0.0.0/8", "172.16.6.7/16")


def test_tso_split_segments_are_valid_tcp():
    eng, c = fastpath.Engine([MapRow.of(TX)]), new_counters()
    pkt = superpacket()
    mss = 1428
    v, reason, outs, dst = fastpath.Harness(eng, c).transmit(vnet(1, 1, 52, mss, 20, 16), pkt)
    assert v.name == "VERDICT_SEND" and reason == -1
    assert len(outs) == -(-len(PAYLOAD) // mss)
    data = b""
    for i, o in enumerate(outs):
        outer = IP(o)
        assert (outer.src, outer.dst, outer.proto) == ("172.16.3.4", "172.16.6.7", 4)
        assert outer.len == len(o) and IP(bytes(outer)).chksum == outer.chksum
        inner = outer[IP].payload
        assert isinstance(inner, IP) and inner.id == 50 + i
        assert inner.len == len(o) - 20 <= 1480
        seg = inner[TCP]
        rebuilt = IP(bytes(inner))
        del rebuilt[TCP].chksum, rebuilt.chksum
        rebuilt = IP(bytes(rebuilt))
        assert rebuilt[TCP].chksum == seg.chksum and rebuilt.chksum == inner.chksum
        assert seg.seq == 1000 + i * mss
        last = i == len(outs) - 1
        assert ("P" in str(seg.flags)) == last and "A" in str(seg.flags)
        data += bytes(seg.payload)
    assert data == PAYLOAD
    names = fastpath.counter_names()
    assert c[names.index("tx_tso_split")] == 1


def test_partial_checksum_completed():
    eng, c = fastpath.Engine([MapRow.of(TX)]), new_counters()
    p = IP(src="241.3.4.9", dst="241.6.7.8") / TCP(sport=1, dport=2) / Raw(b"x" * 333)
    raw = bytearray(bytes(p))
    good = raw[36:38]
    # what the kernel hands over with NEEDS_CSUM: the pseudo-header sum only
    ph = struct.pack("!4s4sBBH", raw[12:16], raw[16:20], 0, 6, len(raw) - 20)
    s = sum(struct.unpack("!6H", ph))
    s = (s & 0xFFFF) + (s >> 16)
    raw[36:38] = struct.pack("!H", s & 0xFFFF)
    v, _, outs, _ = fastpath.Harness(eng, c).transmit(vnet(1, 0, 0, 0, 20, 16), bytes(raw))
    assert v.name == "VERDICT_SEND"
    assert outs[0][20 + 36:20 + 38] == good


def test_bad_gso_header_is_a_counted_drop():
    eng, c = fastpath.Engine([MapRow.of(TX)]), new_counters()
    udp = bytes(IP(src="241.3.4.9", dst="241.6.7.8", proto=17) / Raw(b"y" * 3000))
    v, reason, outs, _ = fastpath.Harness(eng, c).transmit(vnet(1, 1, 28, 1000, 20, 6), udp)
    assert v.name == "VERDICT_DROP" and outs == []
    assert fastpath.counter_names()[reason] == "drop_tx_bad_offload"


def test_gro_coalesces_and_round_trips():
    tx = fastpath.Engine([MapRow.of(TX)])
    rx = fastpath.Engine([MapRow.of(RX)])
    c = new_counters()
    _, _, outs, _ = fastpath.Harness(tx, c).transmit(vnet(1, 1, 52, 1428, 20, 16), superpacket())
    written = fastpath.Harness(rx, c).receive(outs)
    assert len(written) == 1
    idx, segs, buf, _ = written[0]
    assert segs == len(outs)
    flags, gso_type, hdr_len, gso_size, start, off = struct.unpack("=BBHHHH", buf[:10])
    assert (flags, gso_type, gso_size, start, off) == (1, 1, 1428, 20, 16)
    big = IP(buf[10:])
    assert big.len == len(buf) - 10 and bytes(big[TCP].payload) == PAYLOAD
    assert "P" in str(big[TCP].flags)
    # split again: the same segments, byte for byte
    _, _, again, _ = fastpath.Harness(tx, c).transmit(buf[:10], buf[10:])
    assert [o[20:] for o in again] == [o[20:] for o in outs]


def test_gro_keeps_a_corrupt_segment_apart():
    tx = fastpath.Engine([MapRow.of(TX)])
    rx = fastpath.Engine([MapRow.of(RX)])
    c = new_counters()
    _, _, outs, _ = fastpath.Harness(tx, c).transmit(vnet(1, 1, 52, 1428, 20, 16), superpacket())
    bad = bytearray(outs[3])
    bad[-1] ^= 0xFF
    outs[3] = bytes(bad)
    written = fastpath.Harness(rx, c).receive(outs)
    assert [w[1] for w in written][:2] == [3, 1]          # the bad one is written alone
    assert sum(w[1] for w in written) == len(outs)


def test_gro_never_merges_past_a_later_packet_of_the_connection():
    """A segment that continues an older superpacket of its connection, with another packet
    of that connection written in between, starts a new one: merging it would deliver it
    ahead of the packet in between."""
    tx = fastpath.Engine([MapRow.of(TX)])
    rx = fastpath.Engine([MapRow.of(RX)])
    c = new_counters()
    _, _, outs, _ = fastpath.Harness(tx, c).transmit(vnet(1, 1, 52, 1428, 20, 16),
                                                     superpacket(PAYLOAD[:2856], flags="A"))
    # a packet of the same connection with other TCP options (so another header length),
    # e.g. a window probe, sent between the two segments
    probe = bytes(IP(src="241.3.4.9", dst="241.6.7.8", flags="DF") /
                  TCP(sport=4000, dport=5201, seq=999, ack=7, flags="A",
                      options=[("Timestamp", (1, 2)), ("NOP", None), ("NOP", None),
                               ("SAck", (1, 2))]) / Raw(b"z"))
    _, _, (outer_probe,), _ = fastpath.Harness(tx, c).transmit(vnet(), probe)
    written = fastpath.Harness(rx, c).receive([outs[0], outer_probe, outs[1]])
    assert [w[1] for w in written] == [1, 1, 1]
    assert [IP(w[2][10:])[TCP].seq for w in written] == [1000, 999, 1000 + 1428]


@pytest.mark.parametrize("gso_size", [1, 48, 87])
def test_tso_below_the_least_mss_is_a_counted_drop(gso_size):
    """A 20 KB read with gso_size 1 would become 20,000 outer packets (a hostile or broken
    virtio header): a drop, counted, nothing sent."""
    eng, c = fastpath.Engine([MapRow.of(TX)]), new_counters()
    v, reason, outs, _ = fastpath.Harness(eng, c).transmit(vnet(1, 1, 52, gso_size, 20, 16),
                                                           superpacket())
    assert (v.name, outs) == ("VERDICT_DROP", [])
    assert fastpath.counter_names()[reason] == "drop_tx_bad_offload"


def test_single_segment_tso_too_big_without_df_is_dropped_not_sent_whole():
    """A TSO read of one segment without DF that does not fit the underlay: the segment
    path has no fragmenting, so it is a drop - not an oversize packet counted as
    tx_fragmented."""
    eng, c = fastpath.Engine([MapRow.of(TX, 1400)]), new_counters()
    p = bytes(IP(src="241.3.4.9", dst="241.6.7.8", id=50) /
              TCP(sport=4000, dport=5201, seq=1, flags="A") / Raw(b"q" * 1400))
    v, reason, outs, _ = fastpath.Harness(eng, c).transmit(vnet(1, 1, 40, 1460, 20, 16), p)
    names = fastpath.counter_names()
    assert (v.name, outs, names[reason]) == ("VERDICT_DROP", [], "drop_tx_too_big")
    assert c[names.index("tx_fragmented")] == 0


def between(kind: str) -> bytes:
    """A packet of the superpacket's connection (or addresses) that GRO cannot merge."""
    ip = dict(src="241.3.4.9", dst="241.6.7.8")
    tcp = dict(sport=4000, dport=5201, seq=999, ack=7)
    return bytes({
        "pure-ack": IP(flags="DF", **ip) / TCP(flags="A", **tcp),
        "bare-fin": IP(flags="DF", **ip) / TCP(flags="FA", **tcp),
        "bare-rst": IP(flags="DF", **ip) / TCP(flags="R", **tcp),
        "ip-options": IP(flags="DF", options=[IPOption_RR(routers=["1.2.3.4"])], **ip) /
                      TCP(flags="A", **tcp) / Raw(b"o" * 10),
        "fragment": IP(flags=0, frag=100, proto=6, **ip) / Raw(b"f" * 64),
    }[kind])


@pytest.mark.parametrize("kind", ["pure-ack", "bare-fin", "bare-rst", "ip-options",
                                  "fragment"])
def test_gro_never_merges_past_a_packet_it_cannot_merge(kind):
    """A packet of the connection that GRO cannot take (no payload, IP options, a
    fragment) closes the connection's superpacket: the next segment must not be appended
    to the one before it, which would deliver it ahead of that packet."""
    tx, rx = fastpath.Engine([MapRow.of(TX)]), fastpath.Engine([MapRow.of(RX)])
    c = new_counters()
    h = fastpath.Harness(tx, c)
    _, _, outs, _ = h.transmit(vnet(1, 1, 52, 1428, 20, 16),
                               superpacket(PAYLOAD[:2856], flags="A"))
    _, _, (middle,), _ = h.transmit(vnet(), between(kind))
    written = fastpath.Harness(rx, c).receive([outs[0], middle, outs[1]])
    assert [w[1] for w in written] == [1, 1, 1]
    assert bytes(IP(written[1][2][10:])) == between(kind)


# -- UDP: consecutive datagrams of one flow, one size, become one UDP GSO write ---------------
def udp_datagrams(sizes, sport=4000, **ip):
    from scapy.layers.inet import UDP
    return [bytes(IP(src="241.3.4.9", dst="241.6.7.8", flags="DF", id=100 + i, **ip) /
                  UDP(sport=sport, dport=7007) / Raw(bytes((i + k) & 0xFF for k in range(n))))
            for i, n in enumerate(sizes)]


def through(datagrams):
    """The datagrams encapsulated by one host and received by the other, as one burst."""
    tx = fastpath.Engine([MapRow.of(TX)])
    rx = fastpath.Engine([MapRow.of(RX)])
    c = new_counters()
    outs = [fastpath.Harness(tx, c).transmit(vnet(), d)[2][0] for d in datagrams]
    return fastpath.Harness(rx, c).receive(outs)


def split_udp_gso(buf):
    """What the kernel makes of a UDP GSO write (__udp_gso_segment): each gso_size piece of
    the payload behind the superpacket's IP and UDP headers, lengths set."""
    from scapy.layers.inet import UDP
    flags, gso_type, hdr_len, gso_size, start, off = struct.unpack("=BBHHHH", buf[:10])
    big = IP(buf[10:])
    pay = bytes(big[UDP].payload)
    return [(big.tos, big.ttl, big.flags, big.src, big.dst, big[UDP].sport, big[UDP].dport,
             pay[i:i + gso_size]) for i in range(0, len(pay), gso_size)]


def fields(d):
    from scapy.layers.inet import UDP
    p = IP(d)
    return (p.tos, p.ttl, p.flags, p.src, p.dst, p[UDP].sport, p[UDP].dport,
            bytes(p[UDP].payload))


@pytest.mark.parametrize("sizes", [[64] * 10, [1400] * 5 + [700], [18] * 64])
def test_udp_datagrams_coalesce_into_one_gso_write(sizes):
    datagrams = udp_datagrams(sizes)
    written = through(datagrams)
    assert [w[1] for w in written] == [len(sizes)]          # a burst is at most 64
    got = []
    for _, segs, buf, _ in written:
        flags, gso_type, hdr_len, gso_size, start, off = struct.unpack("=BBHHHH", buf[:10])
        assert (flags, gso_type, hdr_len, gso_size, start, off) == \
            (1, 5, 28, sizes[0], 20, 6)                         # NEEDS_CSUM, UDP_L4
        big = IP(buf[10:])
        assert big.len == len(buf) - 10 and IP(bytes(big)).chksum == big.chksum
        # the UDP length covers the whole superpacket; its checksum field holds the
        # pseudo-header sum the kernel completes for each datagram it splits off
        assert struct.unpack_from("!H", buf, 10 + 24)[0] == len(buf) - 10 - 20
        got += split_udp_gso(buf)
    assert got == [fields(d) for d in datagrams]


@pytest.mark.parametrize("case", ["ttl", "tos", "bigger", "fragment", "later-fragment",
                                  "bad-csum", "ports"])
def test_udp_datagrams_that_may_not_join(case):
    """Anything the kernel would copy from the superpacket onto every datagram must match,
    and only the last datagram may be shorter; a bad checksum is never hidden by the
    checksum the kernel computes for the superpacket; and a datagram of another flow
    between two of one flow's keeps them apart only if it is of that flow."""
    from scapy.layers.inet import UDP
    a, b, c = udp_datagrams([100, 100, 100])
    if case == "ttl":
        b = udp_datagrams([100], ttl=9)[0]
    elif case == "tos":
        b = udp_datagrams([100], tos=0x10)[0]
    elif case == "bigger":
        b = udp_datagrams([100, 101])[1]
    elif case == "fragment":        # the first fragment of another datagram of the flow
        b = bytes(IP(src="241.3.4.9", dst="241.6.7.8", flags="MF") /
                  UDP(sport=4000, dport=7007, len=508) / Raw(bytes(100)))
    elif case == "later-fragment":  # no ports: the addresses decide
        b = bytes(IP(src="241.3.4.9", dst="241.6.7.8", proto=17, frag=13) / Raw(bytes(100)))
    elif case == "bad-csum":
        b = bytearray(b)
        b[-1] ^= 0xFF
        b = bytes(b)
    elif case == "ports":
        b = udp_datagrams([100], sport=4001)[0]
    written = through([a, b, c])
    if case == "ports":     # another flow in between: a and c still join
        assert [w[1] for w in written] == [2, 1]
    elif case == "bigger":  # b starts its own, and c (smaller, so last) may join it
        assert [w[1] for w in written] == [1, 2]
    else:
        assert [w[1] for w in written] == [1, 1, 1]
        assert written[1][2][10:] == b


def test_udp_without_checksum_joins_and_round_trips():
    datagrams = []
    for d in udp_datagrams([200] * 4):
        d = bytearray(d)
        d[26:28] = b"\0\0"                                  # no checksum sent (RFC 768)
        datagrams.append(bytes(d))
    written = through(datagrams)
    assert [w[1] for w in written] == [4]
    assert split_udp_gso(written[0][2]) == [fields(d) for d in datagrams]


def tcp_segments(n, mss=1000):
    """n segments of one flow, in order, the last with PSH: what a receive burst merges."""
    return [bytes(IP(src="241.3.4.9", dst="241.6.7.8", flags="DF", id=300 + i) /
                  TCP(sport=4000, dport=5001, seq=1000 + i * mss, ack=7,
                      flags="PA" if i == n - 1 else "A", window=512) /
                  Raw(bytes((i * 7 + k) & 0xFF for k in range(mss)))) for i in range(n)]


@pytest.mark.parametrize("kind", ["udp", "tcp"])
@pytest.mark.parametrize("device", ["probed-without", "refused-at-run-time"])
def test_a_device_without_the_gso_type_gets_the_same_packets_one_by_one(kind, device):
    """What a kernel older than a GSO type gets (UDP_L4 before Linux 6.2): each packet in
    a write of its own, byte for byte the packet the sender sent. Either the probe said so
    (the map's dev_gso lacks the type: nothing merged), or the device refused the
    superpacket (EINVAL) and rx_write_segments split it as the kernel would have."""
    import socket
    packets = udp_datagrams([300] * 9 + [120]) if kind == "udp" else tcp_segments(6)
    gso_bit = fastpath.DEV_GSO_TYPES["udp_l4" if kind == "udp" else "tcpv4"]
    theirs, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tx = fastpath.Engine([MapRow.of(TX)])
    dev_gso = 3 & ~gso_bit if device == "probed-without" else 3
    rx = fastpath.Engine([MapRow.of(RX, tun_fd=ours.fileno(), dev_gso=dev_gso)])
    c = new_counters()
    outs = [fastpath.Harness(tx, c).transmit(vnet(), p)[2][0] for p in packets]
    # refuse: the write path as it is once the device refused the type (rx_write)
    written = fastpath.Harness(rx, c).receive(outs, write=True,
                                              refuse=gso_bit if device != "probed-without"
                                              else 0)
    names = fastpath.counter_names()
    if device == "probed-without":
        assert [w[1] for w in written] == [1] * len(packets)
        assert not any(w[3] for w in written)
    else:
        assert [w[1] for w in written] == [len(packets)] and written[0][3]
        assert c[names.index("rx_gro_merged")] == 0         # no write was saved
    assert c[names.index("rx_packets")] == len(packets)
    assert c[names.index("drop_rx_tun_write")] == 0
    theirs.setblocking(False)
    got = []
    while True:
        try:
            got.append(theirs.recv(65536))
        except BlockingIOError:
            break
    assert [g[:10] for g in got] == [bytes(10)] * len(packets)    # no offload asked
    assert [g[10:] for g in got] == packets
    theirs.close()
    ours.close()
