"""scapy builders for test packets: scapy is the oracle for what is on the wire."""
from __future__ import annotations

import ipaddress
import struct

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR
from scapy.packet import Raw


def a(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def inner(src="241.3.4.9", dst="241.6.7.8", proto="udp", size=64, tos=0, ttl=64, df=False,
          options=False, frag=0, mf=False, ident=1) -> bytes:
    """An overlay packet of exactly `size` bytes (or as small as its headers allow)."""
    flags = ("DF" if df else "") + ("MF" if mf else "")
    ip = IP(src=src, dst=dst, tos=tos, ttl=ttl, flags=flags or 0, frag=frag, id=ident)
    if options:
        ip.options = [IPOption_RR(routers=["1.2.3.4"])]
    l4 = {"udp": UDP(sport=1234, dport=5678), "tcp": TCP(sport=1234, dport=80, flags="S"),
          "icmp": ICMP(type=8, id=7, seq=1), "raw": Raw(b"")}[proto]
    hdr_len = len(ip / l4)
    pad = max(0, size - hdr_len)
    return bytes(ip / l4 / Raw(bytes(i & 0xFF for i in range(pad))))


def outer(payload: bytes, src="172.16.3.4", dst="172.16.6.7", tos=0, ttl=64, proto=4) -> bytes:
    """An IPIP datagram as the raw socket hands it over (outer header included)."""
    return bytes(IP(src=src, dst=dst, tos=tos, ttl=ttl, proto=proto, flags="DF") / Raw(payload))


# TUN offloads (virtio_net_hdr)
PAYLOAD = bytes(i * 7 & 0xFF for i in range(20000))


def mutate(rng, data: bytes, span: int = 44) -> bytes:
    """One to three random edits of data, as a hostile or broken sender makes them:
    truncate, extend, or flip a bit in its first `span` bytes (the headers)."""
    p = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        what = rng.randrange(6)
        if what == 0 and p:
            del p[rng.randrange(len(p)):]                   # truncate
        elif what == 1:
            p += rng.randbytes(rng.randrange(1, 8))         # extend
        elif p:
            i = rng.randrange(min(len(p), span))            # flip a header bit
            p[i] ^= 1 << rng.randrange(8)
    return bytes(p)


def vnet(flags=0, gso_type=0, hdr_len=0, gso_size=0, start=0, offset=0) -> bytes:
    return struct.pack("=BBHHHH", flags, gso_type, hdr_len, gso_size, start, offset)


def superpacket(payload=PAYLOAD, flags="PA", seq=1000) -> bytes:
    p = IP(src="241.3.4.9", dst="241.6.7.8", flags="DF", id=50) / \
        TCP(sport=4000, dport=5201, seq=seq, ack=7, flags=flags,
            options=[("Timestamp", (1, 2))]) / Raw(payload)
    return bytes(p)
