"""The underlay side: one raw IPPROTO_IPIP socket and one packet socket for every fan, a
UDP socket per VXLAN port, and facts about the local underlay interfaces.

With no ipip module the kernel hands every protocol-4 datagram for a local address to raw
sockets. IP_HDRINCL because the engine writes the outer header itself (TTL, DF and ECN
follow the inner packet, docs/spec.md §4 T3, which the kernel's own header could not do per
packet); the same socket sends VXLAN's outer IPv4/UDP packets, whose UDP source port
follows the inner flow (docs/spec.md §6 X3), which a UDP socket's fixed port could not.

The packet socket sends the same packets as Ethernet frames to underlay hosts the kernel
has already resolved (fanpkt/neighbours.py): per packet it skips the kernel's IP output
path, a route lookup and the neighbour lookup, which cost as much as the rest of the send.
It is opened with protocol 0, so it never receives.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import socket
import struct
from ipaddress import IPv4Address
from typing import NamedTuple

from pyroute2 import IPRoute

from .errors import AddressError, DeviceError
from .fanmap import ip
from .netlink import mac_bytes

log = logging.getLogger("fanpkt")
SO_SNDBUFFORCE, SO_RCVBUFFORCE, SO_RXQ_OVFL = 32, 33, 40
SOL_PACKET, PACKET_VNET_HDR = 263, 15
SOL_UDP, UDP_GRO = 17, 104
IP_MTU_DISCOVER, IP_PMTUDISC_PROBE = 10, 3
IP_PKTINFO = 8              # <linux/in.h>; Python's socket module lacks it on some builds
RCVBUF = 64 << 20           # a full buffer makes the kernel answer "protocol unreachable"
SNDBUF = 8 << 20
ARPHRD_ETHER = 1
IFF_LOOPBACK = 0x8
RTAX_MTU = 2                # a route's MTU metric (<linux/rtnetlink.h>)


class Interface(NamedTuple):
    name: str
    index: int      # type: ignore[assignment]  # shadows tuple.index, as the kernel names it
    mtu: int
    mac: bytes              # b"" unless the link is Ethernet: then frames can be sent on it


# Spreading IPIP receive over n loops (docs/internals.md §8). Every raw IPPROTO_IPIP socket gets
# its own clone of each datagram, so n plain sockets would deliver each n times. Instead
# each socket has a classic BPF filter that keeps only its share: a hash of the inner
# addresses (and, for unfragmented TCP and UDP, ports) modulo n must equal its index. A
# datagram is queued on exactly one socket, and a flow always on the same one, in order.
# Outer headers with options (no fan peer sends them) all go to share 0. PACKET_FANOUT
# would avoid the clones, but it taps the link layer: before the host's INPUT firewall,
# reassembly and ip_rcv's checks, which the raw path keeps.
SO_ATTACH_FILTER = 26
_BPF = {"ldb": 0x30, "ldh": 0x28, "ld": 0x20, "ldi": 0x00, "len": 0x80, "ldxmsh": 0xB1,
        "ldind": 0x40, "ldmem": 0x60, "st": 0x02, "tax": 0x07, "txa": 0x87, "xorx": 0xAC,
        "add": 0x04, "rsh": 0x74, "mul": 0x24, "mod": 0x94, "jeq": 0x15, "jge": 0x35,
        "jgex": 0x3D, "jset": 0x45, "ja": 0x05, "ret": 0x06}   # <linux/filter.h> codes


def share_filter(q: int, n: int) -> bytes:
    """The BPF program (struct sock_filter[]) that accepts IPIP datagrams of share q of n.
    The raw socket sees the outer header at 0, the inner at 20. A datagram too short for
    the fields read, or with outer options, is share 0's: the engine counts its drop."""
    prog = [                # (label, op, k, jump if true, jump if false)
        (None, "len", 0, None, None),
        (None, "st", 1, None, None),            # M[1] = length
        (None, "jge", 40, None, "share0"),      # outer + inner header, or share 0
        (None, "ldb", 0, None, None),
        (None, "jeq", 0x45, None, "share0"),    # outer options: share 0
        (None, "ld", 32, None, None),           # inner source
        (None, "tax", 0, None, None),
        (None, "ld", 36, None, None),           # inner destination
        (None, "xorx", 0, None, None),
        (None, "st", 0, None, None),            # M[0] = src ^ dst
        (None, "ldb", 29, None, None),          # inner protocol
        (None, "jeq", 6, "ports", None),
        (None, "jeq", 17, "ports", "hash"),
        ("ports", "ldh", 26, None, None),       # inner fragment field
        (None, "jset", 0x3FFF, "hash", None),   # a fragment: no ports
        (None, "ldxmsh", 20, None, None),       # X = inner IHL
        (None, "txa", 0, None, None),
        (None, "add", 24, None, None),          # the ports end at 20 + IHL + 4
        (None, "tax", 0, None, None),
        (None, "ldmem", 1, None, None),
        (None, "jgex", 0, None, "hash"),        # datagram too short: no ports
        (None, "ldxmsh", 20, None, None),
        (None, "ldind", 20, None, None),        # A = the ports, at 20 + IHL
        (None, "tax", 0, None, None),
        (None, "ldmem", 0, None, None),
        (None, "xorx", 0, None, None),
        (None, "st", 0, None, None),
        ("hash", "ldmem", 0, None, None),       # mix, so that neighbouring hosts spread
        (None, "mul", 0x9E3779B1, None, None),
        (None, "rsh", 16, None, None),
        (None, "mod", n, None, None),
        (None, "ja", 0, "pick", None),
        ("share0", "ldi", 0, None, None),
        ("pick", "jeq", q, None, "drop"),
        (None, "ret", 0x40000, None, None),     # ours: all of it
        ("drop", "ret", 0, None, None),         # another loop's
    ]
    at = {label: i for i, (label, *_rest) in enumerate(prog) if label}
    out = []
    for i, (_, op, k, jt, jf) in enumerate(prog):
        rel = lambda to: at[to] - i - 1 if to else 0     # noqa: E731 - forward only
        if op == "ja":
            k, jt = rel(jt), None
        out.append(struct.pack("HBBI", _BPF[op], rel(jt), rel(jf), k))
    return b"".join(out)


def attach_filter(s: socket.socket, prog: bytes) -> None:
    buf = ctypes.create_string_buffer(prog)
    fprog = struct.pack("HL", len(prog) // 8, ctypes.addressof(buf))
    s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def open_receive_sockets(first: socket.socket, n: int) -> list[socket.socket]:
    """The raw sockets IPIP arrives on, one per receive loop: `first` (the sending
    socket) and n - 1 more, each taking its share (share_filter); n == 1: first alone,
    unfiltered."""
    if n == 1:
        return [first]
    socks = [first]
    try:
        socks += [open_socket() for _ in range(n - 1)]
        for q, s in enumerate(socks):
            attach_filter(s, share_filter(q, n))
    except BaseException:
        for s in socks[1:]:
            s.close()
        raise
    return socks


def open_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_IPIP)
    try:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        # each datagram carries the socket's drop count: drop_rx_socket_full
        s.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SNDBUF)
        # PROBE, not DO: refuse (EMSGSIZE) what exceeds the device MTU, which fanpkt answers
        # with "fragmentation needed" (docs/spec.md §4 T5), but ignore path MTUs the kernel
        # learnt: one forged ICMP quoting IPIP between two fan hosts would otherwise
        # shrink their path for ten minutes.
        s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE)
    except OSError:
        s.close()
        raise
    return s


def open_vxlan_sockets(port: int, n: int = 1) -> list[socket.socket]:
    """n UDP sockets for one VXLAN port, one per receive loop. With n > 1 they form an
    SO_REUSEPORT group: the kernel gives each datagram to one of them by a hash of its
    addresses and ports, and since a peer's source port is its inner flow's hash, each
    inner flow keeps to one socket (one loop, in order)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            socks.append(open_vxlan_socket(port, reuseport=n > 1))
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def open_vxlan_socket(port: int, reuseport: bool = False) -> socket.socket:
    """The UDP socket a VXLAN port's datagrams arrive on (the kernel checks their outer
    IPv4 and UDP headers first). IP_RECVTOS hands over each outer TOS, for ECN;
    IP_PKTINFO each outer destination, which must be the fan's underlay address (V2: the
    socket, bound to 0.0.0.0, also takes broadcasts and other local addresses); UDP_GRO
    (Linux 5.0) lets the kernel hand over a flow's consecutive datagrams in one buffer:
    without it each comes alone, and rx_udp_gro stays 0."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        s.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_RECVTOS, 1)
        s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        try:
            s.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError as e:
            log.warning("UDP GRO unavailable (%s): VXLAN datagrams are received one by "
                        "one", e.strerror)
        s.bind(("0.0.0.0", port))
    except OSError as e:
        s.close()
        if e.errno == errno.EADDRINUSE:
            raise DeviceError(f"UDP port {port} is taken on this host (a kernel vxlan "
                              f"device, or another program): VXLAN fans cannot listen "
                              f"there") from None
        raise
    return s


def open_packet_socket(vnet_hdr: bool = False) -> socket.socket:
    """vnet_hdr: every frame sent starts with a virtio_net_hdr, which lets a VXLAN fan
    hand the kernel one UDP GSO superpacket for many segments (docs/internals.md §3)."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SNDBUF)
        if vnet_hdr:
            s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    except OSError:
        s.close()
        raise
    return s


def frame_mac(link) -> bytes:
    """The MAC to send frames from on a link (a pyroute2 link message); b"" if the link is
    not Ethernet (a tun, a WireGuard or IPIP device, loopback)."""
    if link["ifi_type"] != ARPHRD_ETHER:
        return b""
    return mac_bytes(link.get_attr("IFLA_ADDRESS"))


def interfaces_holding(ipr, addrs: set[int]) -> dict[int, Interface]:
    """The interface each local address of addrs sends the underlay's packets from, read
    through ipr (a pyroute2 IPRoute or NetNS): the one holding it, or, for an address on
    the loopback (a routed host's /32), the one the route toward the underlay leaves by,
    with that route's MTU (lo's 65536 is no underlay's). An address no interface holds is
    absent; one on lo with no route out is AddressError."""
    where = {}
    for msg in ipr.get_addr(family=socket.AF_INET):
        a = msg.get_attr("IFA_LOCAL")
        if a is not None and int(IPv4Address(a)) in addrs:
            where[int(IPv4Address(a))] = msg["index"]
    out = {}
    for a, idx in where.items():
        link = ipr.get_links(idx)[0]
        if link["flags"] & IFF_LOOPBACK:
            out[a] = route_out(ipr, a)
        else:
            out[a] = Interface(link.get_attr("IFLA_IFNAME"), idx, link.get_attr("IFLA_MTU"),
                               frame_mac(link))
    return out


def route_out(ipr, addr: int) -> Interface:
    """The interface and MTU of the route from addr toward its underlay neighbours
    (addr ^ 1 stands for them: it is in any underlay prefix that holds addr and a
    peer). The route's own MTU, if it has one, is the underlay's."""
    why: object = "no route"
    try:
        routes = ipr.route("get", dst=ip(addr ^ 1), src=ip(addr))
    except Exception as e:      # noqa: BLE001 - NetlinkError: unreachable, no such source
        routes, why = [], e
    oif = routes[0].get_attr("RTA_OIF") if routes else None
    link = ipr.get_links(oif)[0] if oif else None
    if link is None or link["flags"] & IFF_LOOPBACK:
        raise AddressError(f"underlay address {ip(addr)} is on the loopback and no route "
                           f"toward its underlay leaves this host ({why}): add one")
    mtu = link.get_attr("IFLA_MTU")
    metrics = routes[0].get_attr("RTA_METRICS")
    if metrics is not None and metrics.get_attr("RTAX_MTU"):
        mtu = min(mtu, metrics.get_attr("RTAX_MTU"))
    return Interface(link.get_attr("IFLA_IFNAME"), oif, mtu, frame_mac(link))


def interface_of(addr: int) -> Interface:
    """The interface holding the local address addr."""
    with IPRoute() as ipr:
        found = interfaces_holding(ipr, {addr})
    if addr not in found:
        raise AddressError(f"underlay address {ip(addr)} is not configured on this host "
                           f"(check `ip -4 addr`)")
    return found[addr]
