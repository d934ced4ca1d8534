"""The Fan map (spec §1-2): vectors, validation, properties, batch forms."""
from __future__ import annotations

import ipaddress
import re

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fanpkt.errors import ConfigError, Unroutable
from fanpkt.fanmap import FanMap, FanTable, hostmask, ip, mask
from fanpkt.engine import MapRow, fastpath

from packets import a
from vectors import UNROUTABLE_TARGET, VECTORS


@pytest.mark.parametrize("overlay,underlay,host,slc,dst,under", VECTORS)
def test_vectors(overlay, underlay, host, slc, dst, under):
    m = FanMap.parse(overlay, underlay)
    assert m.slice_info(a(host))["slice"] == slc
    assert FanMap.parse(overlay, f"{host}/{underlay.split('/')[1]}").gateway == \
        a(slc.split("/")[0]) + 1
    if under is None:
        assert ip(m.dest(a(dst))) == UNROUTABLE_TARGET[dst]
        with pytest.raises(Unroutable, match="broadcast"):
            m.dest_checked(a(dst))
    else:
        assert ip(m.dest_checked(a(dst))) == under


@pytest.mark.parametrize("overlay,underlay,host,slc,dst,under", VECTORS)
def test_vectors_engine_and_numpy(overlay, underlay, host, slc, dst, under):
    m = FanMap.parse(overlay, f"{host}/{underlay.split('/')[1]}")
    eng = fastpath.Engine([MapRow.of(m)])
    idx, got, ok = fastpath.map_dest(eng, a(dst))
    hosts, oks = m.dest_batch(np.array([a(dst)], dtype=np.uint32))
    assert idx == 0 and ok == oks[0] == (under is not None)
    if under:
        assert ip(got) == ip(int(hosts[0])) == under


def test_slice_addresses():
    m = FanMap.parse("241.0.0.0/8", "172.16.3.4/16", host_reserve=3)
    info = m.slice_info(a("172.16.3.4"))
    assert info["gateway"] == "241.3.4.1"
    assert info["host_reserved"] == ["241.3.4.1", "241.3.4.3"]
    assert (info["usable_first"], info["usable_last"]) == ("241.3.4.4", "241.3.4.254")
    assert info["usable_count"] == 251
    assert FanMap.parse("241.0.0.0/8", "172.16.3.4/16").slice_info(a("172.16.3.4"))[
        "usable_count"] == 253


@pytest.mark.parametrize("overlay,name", [
    ("241.0.0.0/8", "fan-241"), ("100.64.0.0/10", "fan-100-64"), ("240.1.0.0/16", "fan-240-1"),
    ("240.0.0.0/4", "fan-240"), ("10.20.30.0/24", "fan-10-20-30")])
def test_device_names(overlay, name):
    m = FanMap.parse(overlay, "192.168.0.0/30" if overlay.endswith("/24") else "172.16.0.0/20")
    assert m.device_name == name and len(name) <= 15


@pytest.mark.parametrize("overlay,underlay,message", [
    ("241.1.0.0/8", "172.16.0.0/16", "241.1.0.0/8 is not a network address"),
    ("241.0.0.0/16", "172.16.0.0/16", "must be longer"),
    ("241.0.0.0/16", "172.16.0.0/8", "must be longer"),
    ("241.0.0.0/16", "172.16.0.0/17", "/31 slices"),
    ("241.0.0.0/8", "172.16.0.0/1", "must be longer"),
    ("127.0.0.0/8", "172.16.0.0/16", "127.0.0.0/8"),
    ("0.0.0.0/8", "172.16.0.0/16", "0.0.0.0/8"),
    ("224.0.0.0/8", "172.16.0.0/16", "224.0.0.0/4"),
    ("192.0.0.0/2", "172.16.0.0/16", "224.0.0.0/4"),
    ("10.0.0.0/8", "10.1.0.0/16", "overlap"),
    ("241.0.0.0/8", "172.16.0.0/16x", "prefix length"),
    ("241.0.0.0/8", "172.16.0.300/16", "not an IPv4 address"),
    ("241.0.0.0", "172.16.0.0/16", "needs a prefix length"),
    ("241.0.0.0/8", "172.16.255.255/16", "broadcast address"),
])
def test_invalid_maps(overlay, underlay, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        FanMap.parse(overlay, underlay)


def test_host_outside_underlay():
    with pytest.raises(ConfigError, match="not inside underlay"):
        FanMap(a("241.0.0.0"), 8, a("172.16.0.0"), 16, a("172.17.0.1"))


def test_table_lookup_and_overlap():
    t = FanTable([FanMap.parse("241.0.0.0/8", "172.16.3.4/16"),
                  FanMap.parse("100.64.0.0/10", "172.16.3.4/20")])
    assert t.for_overlay(a("100.71.91.200")).overlay_len == 10
    assert t.for_overlay(a("9.9.9.9")) is None
    assert len(t.for_underlay(a("172.16.1.1"))) == 2
    with pytest.raises(ConfigError, match="overlaps"):
        t.add(FanMap.parse("241.128.0.0/9", "172.16.3.4/16"))


# -- properties over random valid maps ------------------------------------------------------
# IPv4 addresses from four random bytes: Hypothesis's integers favour small values, which
# would make most overlays 0.x.x.x (forbidden) and most examples a rejection.
addresses = st.binary(min_size=4, max_size=4).map(lambda b: int.from_bytes(b, "big"))


@st.composite
def fan_maps(draw):
    """A valid map O/o over U/u (no host): u >= o + 2 keeps slices at most /30; every /1
    overlaps a forbidden prefix."""
    o = draw(st.integers(2, 28))
    u = draw(st.integers(o + 2, 32))
    try:
        m = FanMap(draw(addresses) & mask(o), o, draw(addresses) & mask(u), u)
    except ConfigError:         # a forbidden overlay, or overlay and underlay overlap
        m = None
    assume(m is not None)
    return m


@settings(max_examples=300, deadline=None)
@given(fan_maps(), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_slice_maps_back_to_host(m, hbits, cbits):
    h = m.underlay | (hbits & hostmask(m.underlay_len))
    assume(m.routable(h))       # not the underlay's network or broadcast address
    net = m.slice_of(h)
    d = net | (cbits & hostmask(m.slice_len))               # any address in the slice
    assert m.dest(d) == h
    eng = fastpath.Engine([MapRow.of(FanMap(m.overlay, m.overlay_len, m.underlay,
                                             m.underlay_len, h))])
    assert fastpath.map_dest(eng, d)[1:] == (h, True)
    hosts, ok = m.dest_batch(np.array([d, net], dtype=np.uint32))
    assert int(hosts[0]) == h and ok[0] and int(hosts[1]) == h


@settings(max_examples=200, deadline=None)
@given(fan_maps(), st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64))
def test_batch_equals_scalar(m, addrs):
    # random addresses are mostly outside the overlay: the same bits inside it too
    addrs += [m.overlay | (x & hostmask(m.overlay_len)) for x in addrs]
    arr = np.array(addrs, dtype=np.uint32)
    hosts, ok = m.dest_batch(arr)
    for x, hh, k in zip(addrs, hosts, ok):
        inside = m.in_overlay(x)
        routable = inside and m.routable(m.dest(x))
        assert bool(k) == routable
        if routable:
            assert int(hh) == m.dest(x)


@st.composite
def any_prefixes(draw):
    """Overlay and underlay prefix lengths: any two, or (as often) an underlay prefix near
    the overlay's, where the valid maps and the slice-length limits are."""
    o = draw(st.integers(0, 32))
    if draw(st.booleans()):
        return o, draw(st.integers(0, 32))
    return o, min(32, o + draw(st.integers(1, 6)))


@settings(max_examples=300, deadline=None)
@given(addresses, addresses, any_prefixes())
def test_invalid_maps_rejected_never_mismapped(oa, ua, lens):
    """Any (O/o, U/u) validates exactly when every spec rule holds, and raises ConfigError
    otherwise."""
    o, u = lens
    onet = ipaddress.IPv4Network((oa & mask(o), o))
    unet = ipaddress.IPv4Network((ua & mask(u), u))
    valid = (u > o and o + 32 - u <= 30 and not onet.overlaps(unet) and
             not any(onet.overlaps(ipaddress.IPv4Network(b))
                     for b in ("0.0.0.0/8", "127.0.0.0/8", "224.0.0.0/4")))
    try:
        m = FanMap.parse(str(onet), str(unet))
    except ConfigError:
        assert not valid, f"{onet} over {unet} rejected"
    else:
        assert valid, f"{onet} over {unet} accepted"
        assert m.dest(m.overlay) == m.underlay


def test_whole_classic_overlay_round_trips():
    """All 16.7 million addresses of 241.0.0.0/8 map and come back to their slice."""
    m = FanMap.parse("241.0.0.0/8", "172.16.0.0/16")
    addrs = np.arange(a("241.0.0.0"), a("242.0.0.0"), dtype=np.uint32)
    hosts, ok = m.dest_batch(addrs)
    assert int(ok.sum()) == (1 << 24) - 2 * 256          # network and broadcast hosts' slices
    back = m.slice_batch(hosts[ok])
    assert np.array_equal(back, addrs[ok] & np.uint32(0xFFFFFF00))
    eng_out = np.empty_like(addrs)
    eng_ok = np.empty(addrs.shape, dtype=np.uint8)
    fastpath.map_batch(fastpath.Engine([MapRow.of(FanMap.parse("241.0.0.0/8", "172.16.3.4/16"))]),
        addrs, eng_out, eng_ok)
    assert np.array_equal(eng_ok.astype(bool), ok) and np.array_equal(eng_out, hosts)
