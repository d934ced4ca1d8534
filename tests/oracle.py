"""A slow, plain-Python statement of docs/design.md §4, written from the rules and not from
the C code: the reference the engine is held to, byte for byte and drop reason for drop
reason.

Verdicts and drop reasons are returned by name, as the engine's enums spell them.
"""
from __future__ import annotations

import functools
import struct

from fanpkt.fanmap import FanMap

IPPROTO_ICMP, IPPROTO_IPIP = 1, 4
DF, MF, OFFSET = 0x4000, 0x2000, 0x1FFF


def checksum(data: bytes) -> int:
    """RFC 1071, one 16-bit word at a time."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def with_checksum(hdr: bytes) -> bytes:
    hdr = hdr[:10] + b"\0\0" + hdr[12:]
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]


def counted(step):
    """Count every drop reason a step returns, as the engine's drop counters do (a
    frag-needed answer counts DROP_TX_TOO_BIG too)."""
    @functools.wraps(step)
    def run(self, data: bytes):
        out = step(self, data)
        if out[1]:
            self.drops[out[1]] = self.drops.get(out[1], 0) + 1
        return out
    return run


class Oracle:
    def __init__(self, maps: list[FanMap], mtu: int = 1500, check_spoof: bool = True):
        self.maps = sorted(maps, key=lambda m: -m.overlay_len)
        self.mtu = mtu
        self.check_spoof = check_spoof
        self.ip_id = 0
        self.drops: dict[str, int] = {}

    def counter(self, name: str) -> int:
        """A drop counter by the engine's name (drop_rx_truncated); the oracle keeps no
        others."""
        if not name.lower().startswith("drop_"):
            raise KeyError(f"the oracle counts drops only, not {name}")
        return self.drops.get(name.upper(), 0)

    def _next_id(self) -> int:
        self.ip_id = (self.ip_id + 1) & 0xFFFF
        return self.ip_id

    def _map_for(self, addr: int):
        for i, m in enumerate(self.maps):
            if m.in_overlay(addr):
                return i, m
        return -1, None

    # -- transmit -----------------------------------------------------------------------
    @counted
    def encap(self, pkt: bytes):
        """(verdict, reason, output bytes, underlay dst)."""
        if len(pkt) < 1 or pkt[0] >> 4 != 4:
            return "VERDICT_DROP", "DROP_TX_NOT_IPV4", b"", 0
        ihl = (pkt[0] & 15) * 4
        if len(pkt) < 20 or ihl < 20 or ihl > len(pkt):
            return "VERDICT_DROP", "DROP_TX_MALFORMED", b"", 0
        tot = struct.unpack_from("!H", pkt, 2)[0]
        if tot < ihl or tot > len(pkt):
            return "VERDICT_DROP", "DROP_TX_MALFORMED", b"", 0
        pkt = pkt[:tot]
        dst = struct.unpack_from("!I", pkt, 16)[0]
        _, m = self._map_for(dst)
        if m is None:
            return "VERDICT_DROP", "DROP_TX_NO_MAP", b"", 0
        under = m.dest(dst)
        if not m.routable(under):
            return "VERDICT_DROP", "DROP_TX_UNROUTABLE", b"", 0
        if under == m.host:
            net = m.local_slice
            if net + 1 <= dst <= net + m.host_reserve:
                return "VERDICT_LOCAL", None, pkt, 0
            return "VERDICT_DROP", "DROP_TX_LOCAL_UNUSED", b"", 0
        frag = struct.unpack_from("!H", pkt, 6)[0]
        if len(pkt) + 20 > self.mtu and frag & DF:
            icmp = self._frag_needed(pkt, m)
            if icmp:
                return "VERDICT_ICMP", "DROP_TX_TOO_BIG", icmp, 0
            return "VERDICT_DROP", "DROP_TX_TOO_BIG", b"", 0
        # without DF a packet too big is sent all the same, in outer fragments
        ecn = pkt[1] & 3
        if ecn == 3:            # CE is encapsulated as ECT(0)
            ecn = 2
        outer = struct.pack("!BBHHHBBHII", 0x45, ecn, len(pkt) + 20, self._next_id(),
                            frag & DF, pkt[8], IPPROTO_IPIP, 0, m.host, under)
        return "VERDICT_SEND", None, with_checksum(outer) + pkt, under

    def _frag_needed(self, pkt: bytes, m: FanMap) -> bytes:
        ihl = (pkt[0] & 15) * 4
        src = struct.unpack_from("!I", pkt, 12)[0]
        frag = struct.unpack_from("!H", pkt, 6)[0]
        if pkt[9] == IPPROTO_ICMP and len(pkt) > ihl and pkt[ihl] in (3, 4, 5, 11, 12):
            return b""          # never an ICMP error about an ICMP error
        if frag & OFFSET or src == 0 or src >> 28 == 0xE or src == 0xFFFFFFFF:
            return b""
        quote = pkt[:548]
        icmp = struct.pack("!BBHHH", 3, 4, 0, 0, self.mtu - 20) + quote
        icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
        hdr = struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(icmp), self._next_id(), 0, 64,
                          IPPROTO_ICMP, 0, m.gateway, src)
        return with_checksum(hdr) + icmp

    # -- receive ------------------------------------------------------------------------
    @counted
    def decap(self, d: bytes):
        """(verdict, reason, inner bytes, map index)."""
        drop = lambda reason: ("VERDICT_DROP", reason, b"", -1)  # noqa: E731
        if len(d) < 20:
            return drop("DROP_RX_TRUNCATED")
        ihl = (d[0] & 15) * 4
        tot, frag = struct.unpack_from("!H2xH", d, 2)
        if d[0] >> 4 != 4 or ihl < 20 or ihl > len(d) or tot != len(d) or frag & (MF | OFFSET):
            return drop("DROP_RX_BAD_OUTER")
        if d[9] != IPPROTO_IPIP:
            return drop("DROP_RX_NOT_IPIP")
        osrc = struct.unpack_from("!I", d, 12)[0]
        if not any(m.in_underlay(osrc) for m in self.maps):
            return drop("DROP_RX_SRC_NOT_UNDERLAY")
        inner = bytearray(d[ihl:])
        if len(inner) < 20 or inner[0] >> 4 != 4:
            return drop("DROP_RX_BAD_INNER")
        iihl = (inner[0] & 15) * 4
        if iihl < 20 or iihl > len(inner) or struct.unpack_from("!H", inner, 2)[0] != len(inner):
            return drop("DROP_RX_BAD_INNER")
        if checksum(bytes(inner[:iihl])) != 0:
            return drop("DROP_RX_BAD_INNER_CSUM")
        idst = struct.unpack_from("!I", inner, 16)[0]
        i, m = self._map_for(idst)
        if m is None or idst & ~((1 << (32 - m.slice_len)) - 1) & 0xFFFFFFFF != m.local_slice:
            return drop("DROP_RX_NOT_LOCAL")
        if self.check_spoof:
            isrc = struct.unpack_from("!I", inner, 12)[0]
            _, sm = self._map_for(isrc)
            if sm is None or sm.dest(isrc) != osrc:
                return drop("DROP_RX_SPOOFED_SRC")
        oecn, iecn = d[1] & 3, inner[1] & 3
        new = iecn
        if oecn == 3:
            if iecn == 0:
                return drop("DROP_RX_ECN_CE_NOT_ECT")
            new = 3
        elif oecn == 1 and iecn == 2:
            new = 1
        if new != iecn:
            # RFC 1624 incremental update, so a header checksum stays exactly as valid as it was.
            old_word = struct.unpack_from("!H", inner, 0)[0]
            inner[1] = (inner[1] & 0xFC) | new
            new_word = struct.unpack_from("!H", inner, 0)[0]
            hc = struct.unpack_from("!H", inner, 10)[0]
            s = (~hc & 0xFFFF) + (~old_word & 0xFFFF) + new_word
            while s >> 16:
                s = (s & 0xFFFF) + (s >> 16)
            struct.pack_into("!H", inner, 10, ~s & 0xFFFF)
        return "VERDICT_DELIVER", None, bytes(inner), i
