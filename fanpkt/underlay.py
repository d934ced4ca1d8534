"""The underlay side: one raw IPPROTO_IPIP socket for every fan, and facts about the
local underlay addresses.

With no ipip module the kernel hands every protocol-4 datagram for a local address to raw
sockets. IP_HDRINCL because the engine writes the outer header itself (TTL, DF and ECN
follow the inner packet per spec §4, which the kernel's own header could not do per packet).
"""
from __future__ import annotations

import socket

from pyroute2 import IPRoute

from .errors import AddressError
from .fanmap import ip

SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
IP_MTU_DISCOVER, IP_PMTUDISC_DO = 10, 2
RCVBUF = 64 << 20           # a full buffer makes the kernel answer "protocol unreachable"
SNDBUF = 8 << 20


def open_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_IPIP)
    try:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SNDBUF)
        s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
    except OSError:
        s.close()
        raise
    return s


def interface_of(addr: int) -> tuple[str, int]:
    """(interface name, MTU) of the interface holding the local address addr."""
    with IPRoute() as ipr:
        for msg in ipr.get_addr(family=socket.AF_INET):
            if msg.get_attr("IFA_LOCAL") == ip(addr):
                link = ipr.get_links(msg["index"])[0]
                return link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_MTU")
    raise AddressError(f"underlay address {ip(addr)} is not configured on this host "
                       f"(check `ip -4 addr`)")
