"""Receive (spec §4): IPIP datagrams through decap, every check, RFC 6040 ECN."""
from __future__ import annotations

import pytest
from scapy.layers.inet import IP

from fanpkt.fanmap import FanMap

from packets import inner, outer


def receiver(factory, **kw):
    """Host 172.16.6.7 with the same two maps as the sender."""
    return factory([FanMap.parse("241.0.0.0/8", "172.16.6.7/16"),
                    FanMap.parse("100.64.0.0/10", "172.16.6.7/20")], **kw)


@pytest.mark.parametrize("proto", ["udp", "tcp", "icmp"])
@pytest.mark.parametrize("size", [20, 64, 1480])
def test_round_trip(impl, impl_factory, proto, size):
    pkt = inner(proto=proto if size > 40 else "raw", size=size)
    _, _, out, _ = impl.encap(pkt)
    verdict, reason, got, idx = receiver(impl_factory).decap(out)
    assert (verdict, reason, got) == ("VERDICT_DELIVER", None, pkt)
    assert idx == 1                                     # the /8 sorts after the /10


def test_round_trip_options_fragments(impl_factory):
    rx = receiver(impl_factory)
    for pkt in (inner(options=True), inner(frag=100, mf=True), inner(size=65515)):
        out = outer(pkt)
        assert rx.decap(out)[2] == pkt


# RFC 6040 §4.2, (outer, inner) -> inner after, or None for a drop
ECN_TABLE = {
    (0, 0): 0, (0, 1): 1, (0, 2): 2, (0, 3): 3,
    (1, 0): 0, (1, 1): 1, (1, 2): 1, (1, 3): 3,
    (2, 0): 0, (2, 1): 1, (2, 2): 2, (2, 3): 3,
    (3, 0): None, (3, 1): 3, (3, 2): 3, (3, 3): 3,
}


@pytest.mark.parametrize("oecn,iecn", sorted(ECN_TABLE))
def test_ecn(impl_factory, oecn, iecn):
    rx = receiver(impl_factory)
    pkt = inner(tos=0x28 | iecn)
    verdict, reason, got, _ = rx.decap(outer(pkt, tos=oecn))
    want = ECN_TABLE[oecn, iecn]
    if want is None:
        assert (verdict, reason) == ("VERDICT_DROP", "DROP_RX_ECN_CE_NOT_ECT")
        return
    assert verdict == "VERDICT_DELIVER"
    ip = IP(got)
    assert ip.tos == 0x28 | want                        # DSCP kept
    assert IP(bytes(ip)).chksum == ip.chksum            # header checksum still right
    if want == iecn:
        assert got == pkt


def test_anti_spoofing(impl_factory):
    spoofed = outer(inner(src="241.9.9.9"), src="172.16.3.4", dst="172.16.6.7")
    assert receiver(impl_factory).decap(spoofed)[:2] == ("VERDICT_DROP", "DROP_RX_SPOOFED_SRC")
    assert receiver(impl_factory, check_spoof=False).decap(spoofed)[0] == "VERDICT_DELIVER"
    outside = outer(inner(src="8.8.8.8"), src="172.16.3.4")
    assert receiver(impl_factory).decap(outside)[1] == "DROP_RX_SPOOFED_SRC"


def bad_csum(pkt: bytes) -> bytes:
    return pkt[:10] + bytes([pkt[10] ^ 0xFF]) + pkt[11:]


GOOD = inner(src="241.6.7.9", dst="241.6.7.10")
FROM = dict(src="172.16.6.7", dst="172.16.6.7")


@pytest.mark.parametrize("datagram,reason", [
    (b"", "DROP_RX_TRUNCATED"),
    (b"\x45", "DROP_RX_TRUNCATED"),
    (outer(GOOD)[:19], "DROP_RX_TRUNCATED"),
    (b"\x65" + outer(GOOD)[1:], "DROP_RX_BAD_OUTER"),              # version 6
    (b"\x44" + outer(GOOD)[1:], "DROP_RX_BAD_OUTER"),              # IHL 4
    (outer(GOOD)[:-1], "DROP_RX_BAD_OUTER"),                       # total length mismatch
    (outer(GOOD, proto=17), "DROP_RX_NOT_IPIP"),
    (outer(GOOD, src="10.9.9.9"), "DROP_RX_SRC_NOT_UNDERLAY"),
    # to the underlay broadcast (every host would take it), or to another host
    (outer(GOOD, src="172.16.6.7", dst="172.16.255.255"), "DROP_RX_OUTER_DST"),
    (outer(GOOD, src="172.16.6.7", dst="172.16.6.8"), "DROP_RX_OUTER_DST"),
    (outer(b"", src="172.16.3.4"), "DROP_RX_BAD_INNER"),
    (outer(GOOD[:19], src="172.16.3.4"), "DROP_RX_BAD_INNER"),
    (outer(b"\x65" + GOOD[1:], src="172.16.3.4"), "DROP_RX_BAD_INNER"),
    (outer(b"\x44" + GOOD[1:], src="172.16.3.4"), "DROP_RX_BAD_INNER"),
    (outer(GOOD + b"\0", src="172.16.3.4"), "DROP_RX_BAD_INNER"),  # inner length mismatch
    (outer(bad_csum(GOOD), src="172.16.3.4"), "DROP_RX_BAD_INNER_CSUM"),
    (outer(inner(dst="241.3.4.9", src="241.6.7.9"), **FROM), "DROP_RX_NOT_LOCAL"),
    (outer(inner(dst="10.0.0.1", src="241.6.7.9"), **FROM), "DROP_RX_NOT_LOCAL"),
    # the slice's own network and broadcast addresses are no container's (§2)
    (outer(inner(dst="241.6.7.0", src="241.6.7.9"), **FROM), "DROP_RX_NOT_LOCAL"),
    (outer(inner(dst="241.6.7.255", src="241.6.7.9"), **FROM), "DROP_RX_NOT_LOCAL"),
    (outer(inner(dst="241.6.7.9", src="241.3.4.9"), **FROM), "DROP_RX_SPOOFED_SRC"),
])
def test_hostile(impl_factory, datagram, reason):
    rx = receiver(impl_factory)
    assert rx.decap(datagram)[:3] == ("VERDICT_DROP", reason, b"")


def test_huge_datagram(impl_factory):
    rx = receiver(impl_factory)
    d = outer(inner(size=65515, src="241.3.4.9", dst="241.6.7.8"))
    assert len(d) == 65535
    assert rx.decap(d)[0] == "VERDICT_DELIVER"
    assert rx.decap(b"\x45" + bytes(65534))[:2] == ("VERDICT_DROP", "DROP_RX_BAD_OUTER")


def test_counters_count_drops(impl_factory):
    rx = receiver(impl_factory)
    rx.decap(b"")
    rx.decap(outer(GOOD, proto=17))
    rx.decap(outer(GOOD, proto=17))
    assert rx.decap(outer(GOOD, **FROM))[0] == "VERDICT_DELIVER"    # counts no drop
    assert rx.counter("drop_rx_truncated") == 1
    assert rx.counter("drop_rx_not_ipip") == 2
    assert rx.counter("drop_rx_spoofed_src") == rx.counter("drop_rx_not_local") == 0
