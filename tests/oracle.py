"""A slow, plain-Python statement of docs/spec.md §4, written from the rules and not from
the C code: the reference the engine is held to, byte for byte and drop reason for drop
reason.

Verdicts and drop reasons are returned by name, as the engine's enums spell them.
"""
from __future__ import annotations

import functools
import struct

from fanpkt.fanmap import FanMap, mask

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


def ecn_decap(oecn: int, inner: bytearray):
    """RFC 6040 §4.2 on the inner IPv4 header in place; None: drop (CE over Not-ECT)."""
    iecn = inner[1] & 3
    new = iecn
    if oecn == 3:
        if iecn == 0:
            return None
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
    return inner


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
        if not m.routable(under) or m.slice_edge(dst):
            return "VERDICT_DROP", "DROP_TX_UNROUTABLE", b"", 0
        if under == m.host:     # an address of our own slice that no interface holds
            return "VERDICT_DROP", "DROP_TX_LOCAL_UNUSED", b"", 0
        frag = struct.unpack_from("!H", pkt, 6)[0]
        if len(pkt) + 20 > self.mtu and frag & DF:
            icmp = self._frag_needed(pkt, m)
            if icmp:
                return "VERDICT_ICMP", "DROP_TX_TOO_BIG", icmp, 0
            return "VERDICT_DROP", "DROP_TX_TOO_BIG", b"", 0
        # without DF a packet too big is sent all the same, in outer fragments - if it has
        # an outer total length at all
        if len(pkt) + 20 > 0xFFFF:
            return "VERDICT_DROP", "DROP_TX_TOO_BIG", b"", 0
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
        if frag & OFFSET or src >> 24 in (0, 127) or src >> 28 == 0xE or src == 0xFFFFFFFF:
            return b""          # RFC 1812 4.3.2.7: no single host there
        _, sm = self._map_for(src)
        if sm is not None and sm.slice_edge(src):
            return b""
        dst = struct.unpack_from("!I", pkt, 16)[0]
        if dst >> 28 == 0xE or dst == 0xFFFFFFFF:
            return b""          # nor to a packet sent to a group
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
        osrc, odst = struct.unpack_from("!II", d, 12)
        um = next((m for m in self.maps if m.in_underlay(osrc)), None)
        if um is None:
            return drop("DROP_RX_SRC_NOT_UNDERLAY")
        if odst != um.host:
            return drop("DROP_RX_OUTER_DST")
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
        if (m is None or idst & ~((1 << (32 - m.slice_len)) - 1) & 0xFFFFFFFF != m.local_slice
                or m.slice_edge(idst)):
            return drop("DROP_RX_NOT_LOCAL")
        if self.check_spoof:
            isrc = struct.unpack_from("!I", inner, 12)[0]
            _, sm = self._map_for(isrc)
            if sm is None or sm.dest(isrc) != osrc:
                return drop("DROP_RX_SPOOFED_SRC")
        if ecn_decap(d[1] & 3, inner) is None:
            return drop("DROP_RX_ECN_CE_NOT_ECT")
        return "VERDICT_DELIVER", None, bytes(inner), i


# -- VXLAN (docs/spec.md §6) --------------------------------------------------------
M32 = 0xFFFFFFFF
ETH_P_IP, ETH_P_ARP, UDP = 0x0800, 0x0806, 17


def _mix(h: int, v: int) -> int:
    h ^= (v * 0xCC9E2D51) & M32
    h = ((h << 13) | (h >> 19)) & M32
    return (h * 5 + 0xE6546B64) & M32


def _final(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def source_port(frame: bytes, seed: int) -> int:
    """The UDP source port of a frame (docs/spec.md §6 X3): a hash of the inner flow, the same
    for both directions, mapped into 32768..60999; non-IPv4 frames hash their EtherType."""
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype != ETH_P_IP or len(frame) < 34:
        h = _final(_mix(seed, ethertype))
    else:
        ip = frame[14:]
        a, b = struct.unpack_from("!II", ip, 12)
        proto, ihl = ip[9], (ip[0] & 15) * 4
        frag = struct.unpack_from("!H", ip, 6)[0]
        ports = 0
        if proto in (6, 17) and len(frame) >= 14 + ihl + 4 and not frag & (MF | OFFSET):
            p1, p2 = struct.unpack_from("!HH", ip, ihl)
            if a > b or (a == b and p1 > p2):
                p1, p2 = p2, p1
            ports = p1 << 16 | p2
        a, b = min(a, b), max(a, b)
        h = _final(_mix(_mix(_mix(_mix(seed, a), b), proto), ports))
    return 32768 + ((h * 28232) >> 32)


class VxlanOracle:
    """One VXLAN fan per map: maps[i] carries vnis[i] on `port`; dev_mac is the bridge's."""

    def __init__(self, maps: list[FanMap], vnis: list[int], port: int = 8472,
                 dev_mac: bytes = b"\x02\xf1\x00\x00\x00\x01", seed: int = 1,
                 mtu: int = 1500, check_spoof: bool = True):
        # longest overlay prefix first, as the engine holds them (map indexes match)
        self.maps = sorted(zip(maps, vnis), key=lambda mv: -mv[0].overlay_len)
        self.port, self.dev_mac, self.seed = port, dev_mac, seed
        self.mtu, self.check_spoof = mtu, check_spoof
        self.local_macs: set[bytes] = set()     # this host's MACs on its fan bridges
        self.ip_id = 0

    def encap(self, frame: bytes):
        """(verdict, reason, outer packet, underlay dst), rules X1-X3."""
        drop = lambda reason: ("VERDICT_DROP", reason, b"", 0)  # noqa: E731
        if len(frame) < 14:
            return drop("DROP_TX_MALFORMED")
        ethertype, p = struct.unpack_from("!H", frame, 12)[0], frame[14:]
        ecn = 0
        if ethertype == ETH_P_IP:
            if len(p) < 20 or p[0] >> 4 != 4:
                return drop("DROP_TX_MALFORMED")
            ihl, tot = (p[0] & 15) * 4, struct.unpack_from("!H", p, 2)[0]
            if ihl < 20 or ihl > len(p) or not ihl <= tot <= len(p):
                return drop("DROP_TX_MALFORMED")
            key, ecn = struct.unpack_from("!I", p, 16)[0], p[1] & 3
            ecn = 2 if ecn == 3 else ecn
        elif ethertype == ETH_P_ARP:
            if len(p) < 28 or struct.unpack_from("!HHBB", p, 0) != (1, ETH_P_IP, 6, 4):
                return drop("DROP_TX_MALFORMED")
            key = struct.unpack_from("!I", p, 24)[0]
        else:
            return drop("DROP_TX_ETHERTYPE")
        found = [(m, v) for m, v in self.maps if m.in_overlay(key)]
        if not found:
            return drop("DROP_TX_NO_MAP")
        m, vni = found[0]
        under = m.dest(key)
        if not m.routable(under) or m.slice_edge(key):
            return drop("DROP_TX_UNROUTABLE")
        if under == m.host:
            return drop("DROP_TX_TO_SELF")
        self.ip_id = (self.ip_id + 1) & 0xFFFF
        ulen = 16 + len(frame)
        outer = with_checksum(struct.pack("!BBHHHBBHII", 0x45, ecn, 20 + ulen, self.ip_id, 0,
                                          64, UDP, 0, m.host, under))
        udp = struct.pack("!HHHH", source_port(frame, self.seed), self.port, ulen, 0)
        body = udp + struct.pack("!BBBBI", 0x08, 0, 0, 0, vni << 8) + frame
        pseudo = struct.pack("!IIBBH", m.host, under, 0, UDP, ulen)
        csum = checksum(pseudo + body) or 0xFFFF
        body = body[:6] + struct.pack("!H", csum) + body[8:]
        return "VERDICT_SEND", None, outer + body, under

    def decap(self, payload: bytes, osrc: int, otos: int = 0, port: int = 8472,
              odst: int | None = None):
        """(verdict, reason, frame, map index), rules V1-V6; odst: the outer destination
        (None: the fan's own underlay address)."""
        drop = lambda reason: ("VERDICT_DROP", reason, b"", -1)  # noqa: E731
        if len(payload) < 8 + 14:
            return drop("DROP_RX_TRUNCATED")
        flags, r1, r2, r3, vni_word = struct.unpack_from("!BBBBI", payload, 0)
        if flags != 0x08 or r1 or r2 or r3 or vni_word & 0xFF:
            return drop("DROP_RX_BAD_VXLAN")
        found = [i for i, (m, v) in enumerate(self.maps)
                 if v == vni_word >> 8 and port == self.port]
        if not found:
            return drop("DROP_RX_UNKNOWN_VNI")
        i = found[0]
        m = self.maps[i][0]
        if not m.in_underlay(osrc):
            return drop("DROP_RX_SRC_NOT_UNDERLAY")
        if odst is not None and odst != m.host:
            return drop("DROP_RX_OUTER_DST")
        frame = bytearray(payload[8:])
        ethertype, p = struct.unpack_from("!H", frame, 12)[0], frame[14:]
        if ethertype == ETH_P_IP:
            if len(p) < 20 or p[0] >> 4 != 4:
                return drop("DROP_RX_BAD_INNER")
            ihl, tot = (p[0] & 15) * 4, struct.unpack_from("!H", p, 2)[0]
            if ihl < 20 or ihl > len(p) or not ihl <= tot <= len(p):
                return drop("DROP_RX_BAD_INNER")
            if checksum(bytes(p[:ihl])) != 0:
                return drop("DROP_RX_BAD_INNER_CSUM")
            ksrc, key = struct.unpack_from("!II", p, 12)
        elif ethertype == ETH_P_ARP:
            if len(p) < 28 or struct.unpack_from("!HHBB", p, 0) != (1, ETH_P_IP, 6, 4):
                return drop("DROP_RX_BAD_INNER")
            ksrc, key = struct.unpack_from("!I", p, 14)[0], struct.unpack_from("!I", p, 24)[0]
        else:
            return drop("DROP_RX_BAD_INNER")
        if bytes(frame[6:12]) == self.dev_mac:
            return drop("DROP_RX_OWN_MAC")
        if bytes(frame[6:12]) in self.local_macs:
            return drop("DROP_RX_LOCAL_MAC")
        if (ethertype == ETH_P_IP and p[9] == UDP and ihl + 4 <= tot
                and struct.unpack_from("!H", p, 6)[0] & 0x1FFF == 0
                and struct.unpack_from("!H", p, ihl + 2)[0] in (67, 68)):
            return drop("DROP_RX_DHCP")
        if key & mask(m.slice_len) != m.local_slice or m.slice_edge(key):
            return drop("DROP_RX_NOT_LOCAL")
        if self.check_spoof and (not m.in_overlay(ksrc) or m.dest(ksrc) != osrc):
            return drop("DROP_RX_SPOOFED_SRC")
        if ethertype == ETH_P_IP:
            inner = bytearray(p)
            verdict = ecn_decap(otos & 3, inner)
            if verdict is None:
                return drop("DROP_RX_ECN_CE_NOT_ECT")
            frame[14:] = inner
        return "VERDICT_DELIVER", None, bytes(frame), i
