"""Which underlay hosts the transmit loops may send Ethernet frames to directly: the
engine's neighbour table, kept from the kernel's.

A packet whose underlay host is in the table goes out as a frame through the packet
socket; any other goes through the raw IP socket, and the kernel routes it and resolves
the host (ARP) as usual - which is also how a host gets into the table. An entry is used
only as the kernel itself would use it:
  - the kernel holds a MAC for it on the map's underlay interface, in a state it sends to
    (REACHABLE, STALE, DELAY, PROBE or PERMANENT; never INCOMPLETE or FAILED);
  - the kernel's route to it leaves by that interface without a gateway.
Frames sent this way are invisible to the kernel's neighbour state machine, so an entry
going STALE while fanpkt sends to it would never be checked again. For those, the refresher
does what a sending kernel does: it marks the entry used (NTF_USE), and the kernel probes
the host and either confirms it or fails it - and a failed entry leaves the table.

The forwarder refreshes the table once a second, and within NEIGH_EVENT_GAP of the kernel
announcing a change of neighbours, links or routes (Doorbell): a flushed or failed entry,
or a route that now sends the host through a gateway, ends frames to it at once rather
than at the next poll or when a cached route verdict expires.
"""
from __future__ import annotations

import errno
import logging
import socket
import time
from ipaddress import IPv4Address
from typing import Any, Callable

from pyroute2 import IPRoute

from .fanmap import FanMap, ip, mask
from .netlink import mac_bytes
from .underlay import Interface, interfaces_holding

log = logging.getLogger("fanpkt")
NUD_REACHABLE, NUD_STALE, NUD_DELAY, NUD_PROBE, NUD_PERMANENT = 0x02, 0x04, 0x08, 0x10, 0x80
USABLE = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT
NTF_USE = 0x01
RTN_UNICAST = 1
ROUTE_TTL = 30.0            # how long a route verdict is trusted without a route change
RTMGRP_LINK, RTMGRP_NEIGH, RTMGRP_IPV4_ROUTE = 0x01, 0x04, 0x40


class Doorbell:
    """A netlink socket subscribed to rtnetlink groups, read only to learn *that* something
    changed: the refresh then reads the state itself through pyroute2, so nothing here
    parses netlink, and a burst of announcements costs one refresh."""

    def __init__(self, groups: int):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                                  | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self.sock.bind((0, groups))

    def fileno(self) -> int:
        return self.sock.fileno()

    def rang(self) -> bool:
        """Empty the socket; True if anything arrived. An overflow (ENOBUFS: announcements
        were lost) counts as a ring, since a refresh reads everything anyway."""
        rang = False
        while True:
            try:
                self.sock.recv(65536)
            except BlockingIOError:
                return rang
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
            rang = True

    def close(self) -> None:
        self.sock.close()


class NeighbourWatch:
    """The refresher's reads of the kernel's tables. Each follow() and table() opens its
    own netlink socket and closes it (0.5 ms): pyroute2 0.9 leaves the kernel's ACK of
    every single-object request (`route get`, `link get`) queued on a long-lived socket,
    where a refresh a second piled up thousands of messages (docs/internals.md §10)."""

    def __init__(self, netlink: Callable[[], Any] = IPRoute):
        """netlink: opens the pyroute2 socket to use (IPRoute, or a NetNS in tests)."""
        self.netlink = netlink
        self.routes: dict[int, tuple[bool, float]] = {}
        self.bells: list[Doorbell] = []

    def close(self) -> None:
        for bell in self.bells:
            bell.close()

    def subscribe(self) -> list[Doorbell]:
        """Doorbells (select()-able) for the kernel's announcements that can change the
        table: neighbours and links, and routes. Only for this process's namespace."""
        self.bells = [Doorbell(RTMGRP_NEIGH | RTMGRP_LINK), Doorbell(RTMGRP_IPV4_ROUTE)]
        return self.bells

    def changed(self, ready) -> bool:
        """Empty the ready doorbells; True if the table should be refreshed. A route change
        also drops every cached route verdict."""
        neigh, route = self.bells
        rang = neigh in ready and neigh.rang()
        if route in ready and route.rang():
            self.routes.clear()
            rang = True
        return rang

    def scan(self, links: dict[int, set[tuple[int, int]]]) -> tuple[frozenset, dict]:
        """The entries the engine may use, as (address, ifindex, MAC), and the STALE ones
        among them as {address: ifindex}. links: ifindex -> underlay networks
        (network, mask) of the maps on that interface."""
        with self.netlink() as ipr:
            return self._scan(ipr, links)

    def _scan(self, ipr, links: dict[int, set[tuple[int, int]]]) -> tuple[frozenset, dict]:
        entries, stale = set(), {}
        now = time.monotonic()
        known, self.routes = self.routes, {}    # forget hosts the kernel has forgotten
        for msg in ipr.get_neighbours(family=socket.AF_INET):
            idx, state = msg["ifindex"], msg["state"]
            nets = links.get(idx)
            mac = mac_bytes(msg.get_attr("NDA_LLADDR"))
            if not nets or not state & USABLE or not mac:
                continue
            a = int(IPv4Address(msg.get_attr("NDA_DST")))
            if not any(a & mask == net for net, mask in nets):
                continue
            if not self._direct(ipr, a, idx, now, known):
                continue
            entries.add((a, idx, mac))
            if state & NUD_STALE:
                stale[a] = idx
        return frozenset(entries), stale

    def _direct(self, ipr, a: int, idx: int, now: float, known: dict) -> bool:
        """Does the kernel's route to a leave by interface idx, on-link?"""
        verdict, until = known.get(a, (False, 0.0))
        if until > now:
            self.routes[a] = (verdict, until)
            return verdict
        routes = ipr.route("get", dst=str(IPv4Address(a)))
        verdict = bool(routes) and routes[0]["type"] == RTN_UNICAST and \
            routes[0].get_attr("RTA_OIF") == idx and routes[0].get_attr("RTA_GATEWAY") is None
        self.routes[a] = (verdict, now + ROUTE_TTL)
        return verdict

    def follow(self, underlays: dict[int, Interface]) -> dict[int, Interface]:
        """Follow each fan's underlay address (address -> the Interface it was on) to the
        interface that holds it now: a bond's MAC changes on failover, a re-created
        interface (a NIC replugged) has a new index, and while no interface holds it, it
        gets no MAC, so no frames. Returns the changed ones only. The MTU stays the one
        the fan came up with: a lowered one is learnt from EMSGSIZE, and the TUN's does
        not change under a running forwarder."""
        with self.netlink() as ipr:
            now = interfaces_holding(ipr, set(underlays))
        moved = {}
        for a, was in underlays.items():
            n = now.get(a)
            cur = was._replace(mac=b"") if n is None else n._replace(mtu=was.mtu)
            if cur != was:
                log.info("underlay address %s now on %s (index %d), frames %s", ip(a),
                         cur.name, cur.index, f"from {cur.mac.hex(':')}" if cur.mac else "off")
                moved[a] = cur
        return moved

    def table(self, fans: list[tuple[FanMap, Interface]], used: list[int]) -> frozenset:
        """The engine's neighbour entries for these fans (map, its underlay interface),
        as (address, ifindex, MAC); the STALE ones that frames went to (`used`, from the
        engine's marks) are handed to the kernel to re-check."""
        links: dict[int, set] = {}
        for m, u in fans:
            if u.mac:
                links.setdefault(u.index, set()).add((m.underlay, mask(m.underlay_len)))
        with self.netlink() as ipr:
            entries, stale = self._scan(ipr, links)
            self._confirm(ipr, {a: stale[a] for a in used if a in stale})
        return entries

    def confirm(self, hosts: dict[int, int]) -> None:
        """Have the kernel re-check these STALE entries ({address: ifindex}), as it would
        on sending to them itself."""
        with self.netlink() as ipr:
            self._confirm(ipr, hosts)

    @staticmethod
    def _confirm(ipr, hosts: dict[int, int]) -> None:
        for a, idx in hosts.items():
            ipr.neigh("set", dst=str(IPv4Address(a)), ifindex=idx, flags=NTF_USE)


def bridge_macs(ipr, bridges: set[int]) -> frozenset:
    """The unicast MACs in the forwarding databases of these bridges (ifindexes): this
    host's side of its VXLAN fans. The TAP port learns nothing (plumbing.wire_port), so
    every entry is a port's own MAC or one learnt from a local port: a container's."""
    macs = set()
    for msg in ipr.get_neighbours(family=socket.AF_BRIDGE):
        if msg.get_attr("NDA_MASTER") not in bridges:
            continue
        mac = mac_bytes(msg.get_attr("NDA_LLADDR"))
        if len(mac) == 6 and not mac[0] & 1:
            macs.add(mac)
    return frozenset(macs)
