"""Transmit (spec §4): scapy-built overlay packets through encap, parsed back by scapy."""
from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, IPerror, defragment

from fanpkt.fanmap import FanMap
from fanpkt.engine import COUNTER_NAMES, MapRow, fastpath, new_counters

from conftest import classic_maps
from packets import a, inner, superpacket, vnet

MAP = FanMap.parse("241.0.0.0/8", "172.16.3.4/16")

ECN = [0, 1, 2, 3]


def outer_ok(out: bytes, pkt: bytes):
    o = IP(out)
    assert o.version == 4 and o.ihl == 5 and o.proto == 4
    assert o.len == len(pkt) + 20 == len(out)
    assert IP(bytes(o)).chksum == o.chksum              # scapy recomputes: must agree
    assert bytes(o.payload) == pkt                      # inner untouched
    return o


@pytest.mark.parametrize("proto", ["udp", "tcp", "icmp"])
@pytest.mark.parametrize("size", [20, 28, 64, 576, 1400, 1480])
def test_fields(impl, proto, size):
    pkt = inner(proto=proto if size > 40 else "raw", size=size, ttl=64)
    verdict, reason, out, dst = impl.encap(pkt)
    assert (verdict, reason) == ("VERDICT_SEND", None)
    o = outer_ok(out, pkt)
    assert (o.src, o.dst, dst) == ("172.16.3.4", "172.16.6.7", 0xAC100607)
    assert o.ttl == 64 and o.tos == 0 and o.frag == 0


@pytest.mark.parametrize("ttl", [1, 64, 255])
@pytest.mark.parametrize("df", [False, True])
@pytest.mark.parametrize("ecn", ECN)
def test_ttl_df_ecn_copied(impl, ttl, df, ecn):
    pkt = inner(ttl=ttl, df=df, tos=0xB8 | ecn)         # DSCP EF must not leak outside
    verdict, _, out, _ = impl.encap(pkt)
    o = outer_ok(out, pkt)
    assert o.ttl == ttl
    assert bool(o.flags.DF) == df and not o.flags.MF
    assert o.tos == (2 if ecn == 3 else ecn)            # CE -> ECT(0), DSCP 0


def test_options_and_fragments(impl):
    for pkt in (inner(options=True, size=100), inner(frag=10, size=100),
                inner(mf=True, size=100)):
        verdict, _, out, _ = impl.encap(pkt)
        assert verdict == "VERDICT_SEND"
        assert IP(outer_ok(out, pkt).payload.original).options == IP(pkt).options


def test_ids_do_not_repeat(impl):
    ids = [IP(impl.encap(inner())[2]).id for _ in range(1000)]
    assert len(set(ids)) == 1000


# -- the outer IP ID: +1 for every packet that leaves, wrapping at 16 bits (a Harness keeps a
# sequence of its own; run_tx's loops take blocks of the host's, test_queues.py) ----------
TOO_BIG = dict(size=1481, df=True, proto="tcp")     # answered with frag-needed
TSO = vnet(1, 1, 52, 1428, 20, 16)                  # superpacket(): 15 segments of 1428


def harness():
    return fastpath.Harness(fastpath.Engine([MapRow.of(MAP)]), new_counters())


def sent_id(h, pkt) -> int:
    verdict, _, out, _ = h.encap(pkt)
    assert verdict.name == "VERDICT_SEND"
    return IP(out).id


def test_ids_count_up_by_one_per_outer_packet(impl):
    """Both implementations: IDs 1, 2, 3, ...; a frag-needed answer takes the next one;
    drops, local deliveries and errors not answered take none."""
    def ident(pkt, verdict):
        v, _, out, _ = impl.encap(pkt)
        assert v == verdict
        return IP(out).id

    assert [ident(inner(), "VERDICT_SEND") for _ in range(3)] == [1, 2, 3]
    assert ident(inner(**TOO_BIG), "VERDICT_ICMP") == 4
    assert impl.encap(inner(dst="10.1.2.3"))[0] == "VERDICT_DROP"
    assert impl.encap(inner(dst="241.3.4.1"))[0] == "VERDICT_DROP"
    icmp_error = bytes(IP(src="241.3.4.9", dst="241.6.7.8", flags="DF") / ICMP(type=3, code=1)
                       / (b"x" * 1500))
    assert impl.encap(icmp_error)[:2] == ("VERDICT_DROP", "DROP_TX_TOO_BIG")
    assert ident(inner(), "VERDICT_SEND") == 5
    assert ident(inner(**TOO_BIG), "VERDICT_ICMP") == 6
    assert ident(inner(size=100), "VERDICT_SEND") == 7


def test_engine_ids_are_its_own_per_loop():
    """encap_one and tx_packet draw from the same sequence; the Harness's ip_id is the
    last one used; another loop (Harness) has its own sequence."""
    h = harness()
    assert h.ip_id == 0
    assert [sent_id(h, inner()) for _ in range(3)] == [1, 2, 3] and h.ip_id == 3
    v, _, outs, _ = h.transmit(vnet(), inner())
    assert v.name == "VERDICT_SEND" and [IP(o).id for o in outs] == [4]
    v, _, outs, _ = h.transmit(vnet(), inner(**TOO_BIG))  # written back to the TUN
    assert v.name == "VERDICT_ICMP" and IP(outs[0][10:]).id == 5 and h.ip_id == 5
    assert sent_id(h, inner()) == 6
    other = harness()
    assert sent_id(other, inner()) == 1 and h.ip_id == 6


def test_tso_segments_take_consecutive_ids():
    h = harness()
    assert sent_id(h, inner()) == 1
    v, _, outs, _ = h.transmit(TSO, superpacket())
    assert v.name == "VERDICT_SEND" and len(outs) == 15
    assert [IP(o).id for o in outs] == list(range(2, 17))
    assert [IP(o)[IP].payload.id for o in outs] == list(range(50, 65))   # inner: 50 + i
    assert h.ip_id == 16 and sent_id(h, inner()) == 17
    # a superpacket whose segments do not fit the MTU is answered, and takes one ID
    v, _, outs, _ = h.transmit(vnet(1, 1, 52, 1480, 20, 16), superpacket())
    assert v.name == "VERDICT_ICMP" and IP(outs[0][10:]).id == 18
    assert sent_id(h, inner()) == 19


def test_fragments_share_one_id():
    h = harness()
    assert sent_id(h, inner()) == 1
    v, _, outs, _ = h.transmit(vnet(), inner(size=3000))
    assert v.name == "VERDICT_SEND" and [IP(o).id for o in outs] == [2, 2, 2]
    assert sent_id(h, inner()) == 3


def test_ids_wrap_to_zero():
    h = harness()
    h.ip_id = 65534
    assert [sent_id(h, inner()) for _ in range(3)] == [65535, 0, 1]
    h.ip_id = 65535
    v, _, out, _ = h.encap(inner(**TOO_BIG))
    assert v.name == "VERDICT_ICMP" and IP(out).id == 0 and h.ip_id == 0
    h.ip_id = 65530
    _, _, outs, _ = h.transmit(TSO, superpacket())
    assert [IP(o).id for o in outs] == [65531, 65532, 65533, 65534, 65535, *range(10)]
    assert h.ip_id == 9 and sent_id(h, inner()) == 10


def test_big_packets(impl_factory):
    impl = impl_factory(classic_maps(), mtu=65535)
    for size in (9000, 32768, 65515):
        pkt = inner(size=size)
        verdict, _, out, _ = impl.encap(pkt)
        assert verdict == "VERDICT_SEND" and len(out) == size + 20
        outer_ok(out, pkt)
    verdict, reason, out, _ = impl.encap(inner(size=65535, df=True))
    assert (verdict, reason) == ("VERDICT_ICMP", "DROP_TX_TOO_BIG")


@pytest.mark.parametrize("size", [65516, 65535])
def test_no_outer_length_no_packet(impl_factory, size):
    """An inner packet of 65516 bytes or more would wrap the outer 16-bit total length:
    its fragments could never be reassembled. A counted drop, on any MTU."""
    for mtu in (1500, 65535):
        impl = impl_factory(classic_maps(), mtu=mtu)
        assert impl.encap(inner(size=size))[:3] == ("VERDICT_DROP", "DROP_TX_TOO_BIG", b"")


def test_padding_after_total_length_is_dropped_from_output(impl):
    pkt = inner(size=100)
    verdict, _, out, _ = impl.encap(pkt + b"\0" * 10)
    assert verdict == "VERDICT_SEND" and bytes(IP(out).payload) == pkt


def test_too_big_with_df_answers_frag_needed(impl):
    pkt = inner(size=1481, df=True, proto="tcp")
    verdict, reason, out, _ = impl.encap(pkt)
    assert (verdict, reason) == ("VERDICT_ICMP", "DROP_TX_TOO_BIG")
    r = IP(out)
    assert IP(bytes(r)).chksum == r.chksum
    assert (r.src, r.dst, r.proto) == ("241.3.4.1", "241.3.4.9", 1)
    icmp = r[ICMP]
    assert (icmp.type, icmp.code, icmp.nexthopmtu) == (3, 4, 1480)
    assert ICMP(bytes(icmp)).chksum == icmp.chksum
    assert bytes(r[IPerror])[:20] == pkt[:20]
    assert len(out) <= 576


def test_too_big_without_df_is_encapsulated_whole(impl):
    pkt = inner(size=1481, df=False)
    verdict, reason, out, _ = impl.encap(pkt)
    assert (verdict, reason) == ("VERDICT_SEND", None)
    assert IP(out).flags == 0 and bytes(IP(out).payload) == pkt


@pytest.mark.parametrize("size,mtu", [(1481, 1500), (9000, 1500), (65515, 1500), (3000, 576)])
def test_too_big_without_df_leaves_as_fragments_that_reassemble(size, mtu):
    """What the transmit loop sends: fragments of at most the underlay MTU, the payload in
    multiples of 8, one ID, MF on all but the last; together the whole outer packet."""
    eng = fastpath.Engine([MapRow.of(MAP, mtu)])
    c = new_counters()
    pkt = inner(size=size, df=False)
    v, reason, frags, dst = fastpath.Harness(eng, c).transmit(bytes(10), pkt)
    assert v.name == "VERDICT_SEND" and dst == a("172.16.6.7")
    parts = [IP(f) for f in frags]
    assert len(parts) == -(-(size) // ((mtu - 20) // 8 * 8)) > 1
    assert all(len(f) <= mtu and IP(bytes(p)).chksum == p.chksum for f, p in zip(frags, parts))
    assert len({p.id for p in parts}) == 1 and [p.flags.MF for p in parts] == \
        [1] * (len(parts) - 1) + [0]
    whole = defragment(parts)
    assert len(whole) == 1 and bytes(whole[0].payload) == pkt
    assert c[COUNTER_NAMES.index("tx_fragmented")] == 1


def test_no_icmp_about_icmp_errors(impl):
    err = bytes(IP(src="241.3.4.9", dst="241.6.7.8", flags="DF") / ICMP(type=3, code=1)
                / (b"x" * 1500))
    assert impl.encap(err)[:2] == ("VERDICT_DROP", "DROP_TX_TOO_BIG")


@pytest.mark.parametrize("src", [
    "127.0.0.5",        # loopback: no single host on the wire
    "0.1.2.3",          # "this network"
    "241.3.4.0",        # a slice's network address
    "241.3.4.255",      # ... and its broadcast address
    "100.64.195.255",   # the broadcast of a /22 slice of the second map
])
def test_no_icmp_to_sources_that_are_no_single_host(impl, src):
    """RFC 1812 4.3.2.7: an ICMP error never goes to a source that names no single host."""
    pkt = inner(src=src, dst="241.6.7.8", size=1481, df=True, proto="tcp")
    assert impl.encap(pkt)[:3] == ("VERDICT_DROP", "DROP_TX_TOO_BIG", b"")


def test_icmp_is_rate_limited_per_loop():
    """A container that floods oversized DF packets (any source it likes) gets at most a
    burst of ICMPs and then about one per millisecond; the rest are counted."""
    import time
    eng = fastpath.Engine([MapRow.of(MAP, 1500)])
    c = new_counters()
    h = fastpath.Harness(eng, c, icmp_limit=True)
    pkt = inner(**TOO_BIG)
    start = time.monotonic()
    verdicts = [h.encap(pkt)[0].name for _ in range(2000)]
    elapsed_ms = (time.monotonic() - start) * 1000
    sent = verdicts.count("VERDICT_ICMP")
    limited = c[COUNTER_NAMES.index("tx_icmp_rate_limited")]
    assert sent + limited == 2000 and c[COUNTER_NAMES.index("drop_tx_too_big")] == 2000
    assert verdicts[:50] == ["VERDICT_ICMP"] * 50                   # the burst
    assert 50 <= sent <= 50 + elapsed_ms + 1                       # then 1000 a second
    assert c[COUNTER_NAMES.index("tx_icmp_frag_needed")] == sent


def test_largest_fitting_packet_is_sent(impl):
    assert impl.encap(inner(size=1480, df=True))[0] == "VERDICT_SEND"


@pytest.mark.parametrize("dst,verdict,reason", [
    ("10.1.2.3", "VERDICT_DROP", "DROP_TX_NO_MAP"),
    ("241.255.255.9", "VERDICT_DROP", "DROP_TX_UNROUTABLE"),      # -> underlay broadcast
    ("241.0.0.9", "VERDICT_DROP", "DROP_TX_UNROUTABLE"),          # -> underlay network
    # Own slice: an address the host held would never reach the TUN, so none of them is
    # written back (that looped until the TTL ran out, for host-reserve addresses).
    ("241.3.4.1", "VERDICT_DROP", "DROP_TX_LOCAL_UNUSED"),        # own gateway, removed
    ("241.3.4.2", "VERDICT_DROP", "DROP_TX_LOCAL_UNUSED"),        # host reserve, unused
    ("241.3.4.9", "VERDICT_DROP", "DROP_TX_LOCAL_UNUSED"),        # own slice, no bridge
    ("241.6.7.0", "VERDICT_DROP", "DROP_TX_UNROUTABLE"),          # a slice's network
    ("241.6.7.255", "VERDICT_DROP", "DROP_TX_UNROUTABLE"),        # a slice's broadcast
    ("100.64.192.0", "VERDICT_DROP", "DROP_TX_UNROUTABLE"),       # the /22 slice's network
    ("100.64.195.255", "VERDICT_DROP", "DROP_TX_UNROUTABLE"),     # ... and broadcast
    ("100.64.196.1", "VERDICT_SEND", None),                       # second, unaligned map
])
def test_destinations(impl, dst, verdict, reason):
    pkt = inner(src="241.3.4.1", dst=dst)
    assert impl.encap(pkt)[:2] == (verdict, reason)


def test_second_map_destination(impl):
    m = FanMap.parse("100.64.0.0/10", "172.16.3.4/20")
    _, _, out, dst = impl.encap(inner(src="241.3.4.1", dst="100.71.91.200"))
    assert dst == m.dest(0x64475BC8)
    assert IP(out).src == "172.16.3.4"


@pytest.mark.parametrize("pkt,reason", [
    (b"", "DROP_TX_NOT_IPV4"),
    (b"\x45", "DROP_TX_MALFORMED"),
    (b"\x60" + bytes(39), "DROP_TX_NOT_IPV4"),                   # IPv6
    (bytes([0x44]) + inner()[1:], "DROP_TX_MALFORMED"),          # IHL 4
    (bytes([0x4F]) + inner(size=40)[1:], "DROP_TX_MALFORMED"),  # IHL 15 > length
    (inner()[:2] + b"\xff\xff" + inner()[4:], "DROP_TX_MALFORMED"),  # total length > packet
    (inner()[:2] + b"\x00\x10" + inner()[4:], "DROP_TX_MALFORMED"),  # total length < IHL
])
def test_malformed(impl, pkt, reason):
    assert impl.encap(pkt)[:3] == ("VERDICT_DROP", reason, b"")
