"""The userspace engine as a data path (fanpkt/datapath.py): a TUN (IPIP) or TAP (VXLAN)
per fan (fanpkt/tun.py), the engine's table of every fan it carries, and its loops
(fanpkt/engine.py, the door to the compiled core).

Threads (docs/internals.md §2): one transmit loop per device queue of each fan (its TUN or
TAP -> the raw socket, or the packet socket for resolved neighbours), IPIP receive loops
on the raw socket (-> every IPIP fan's TUN), and receive loops per VXLAN UDP port (its
sockets -> the TAPs of that port's fans). A port's sockets are open while a fan of this
path uses it: the kernel path cannot have it then.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional, cast

from .config import MAX_FANS
from .datapath import DataPath, Fan
from .engine import Dataplane, MapRow
from .netlink import mac_bytes
from .runstate import rx_block, tx_block, vxlan_rx_block
from .tun import Tun, check_tun_available
from .underlay import (open_packet_socket, open_receive_sockets, open_socket,
                       open_vxlan_sockets)

if TYPE_CHECKING:
    import socket

    from .config import FanSpec
    from .runstate import Counters

log = logging.getLogger("fanpkt")


def tx_loop_names(device: str, queues: int) -> list[str]:
    """A fan's transmit loops, one per device queue: tx-241, tx-241.1, ..."""
    base = f"tx-{device[4:]}"
    return [base if q == 0 else f"{base}.{q}" for q in range(queues)]


def vxlan_loop(port: int, q: int) -> str:
    """Receive loop q of VXLAN UDP port `port`."""
    return f"rx-vxlan-{port}" if q == 0 else f"rx-vxlan-{port}.{q}"


def _tun(fan: Fan) -> Tun:
    return cast(Tun, fan.device)     # install() made every device of this path


class UserPath(DataPath):
    """The engine, its sockets and its fans' devices, for the forwarder's run."""

    name = "user"

    def __init__(self, check_spoof: bool, queues: int):
        self.queues = queues                        # per device, and per VXLAN port
        self.dp = Dataplane(check_spoof)
        self.fans: dict[int, Fan] = {}              # slot -> fan, started, in start order
        self.counters: Optional[Counters] = None
        self.sock: Optional[socket.socket] = None
        self.packet_sock: Optional[socket.socket] = None
        self.gso_sock: Optional[socket.socket] = None   # VXLAN UDP GSO (a vnet-header socket)
        self.rx_socks: list = []                    # IPIP: self.sock, then one per loop
        self.vxlan_socks: dict[int, list] = {}      # UDP port -> its sockets, one per loop
        self.vxlan_blocks: dict[int, int] = {}      # UDP port -> k of its vxlan_rx_blocks

    @staticmethod
    def check_host() -> None:
        """Raise DeviceError if this host cannot give the engine a TUN or TAP (every
        forwarder needs the engine: IPIP fans run on nothing else)."""
        check_tun_available()

    def open(self, counters: Counters, send_frames: bool) -> None:
        """The raw socket every transmit loop sends on (and IPIP receives on), and with
        send_frames the packet sockets for frames to resolved neighbours."""
        self.counters = counters
        self.sock = open_socket()
        if send_frames:
            self.packet_sock = open_packet_socket()
            try:
                self.gso_sock = open_packet_socket(vnet_hdr=True)
            except OSError as e:    # no PACKET_VNET_HDR: frames one send each
                log.warning("no virtio headers on packet sockets here (%s): VXLAN "
                            "frames are sent one by one", e.strerror)

    # -- fans --------------------------------------------------------------------------
    def install(self, spec: FanSpec, slot: int, mtu: int) -> Tun:
        return Tun(spec.map.device_name, mtu, tap=spec.vxlan, queues=self.queues)

    def start(self, fans: list[Fan]) -> None:
        """The table with the fans, the IPIP receive loops (at the first start), their
        ports' sockets and loops, and their transmit loops."""
        for fan in fans:
            self.fans[fan.slot] = fan
        self._install_table()
        if not self.rx_socks:
            assert self.sock is not None and self.counters is not None, "open() first"
            self.rx_socks = open_receive_sockets(self.sock, self.queues)
            for q, sock in enumerate(self.rx_socks):
                self.dp.start_rx("rx" if q == 0 else f"rx.{q}", sock.fileno(),
                                 self.counters.block(rx_block(q)))
        self._sync_vxlan_ports()
        for fan in fans:
            self._start_tx(fan)

    def replace(self, fans: list[Fan]) -> None:
        self._install_table()       # rows with the new interfaces' MTU, index and MAC

    def remove(self, fans: list[Fan]) -> None:
        """Their loops stopped first, then the table without them: no loop reads a
        device that is gone."""
        started = [f for f in fans if self.fans.pop(f.slot, None) is not None]
        for fan in fans:
            for name in self._loop_names(fan):
                self.dp.stop_loop(name)
        try:
            if started:
                self._install_table()
        finally:
            for fan in fans:
                fan.device.close()
        self._sync_vxlan_ports()

    def stop(self, fans: list[Fan]) -> None:
        self.dp.stop()
        for fan in fans:
            fan.device.close()
        self.fans.clear()
        for sock in self.rx_socks[1:]:
            sock.close()
        self.rx_socks = []
        for s in (self.sock, self.packet_sock, self.gso_sock):
            if s is not None:
                s.close()
        self.sock = self.packet_sock = self.gso_sock = None
        for socks in self.vxlan_socks.values():
            for sock in socks:
                sock.close()
        self.vxlan_socks.clear()
        self.vxlan_blocks.clear()

    def holds_port(self, port: int, fans: list[Fan]) -> bool:
        # any of them, started or not: its socket may not be open yet
        return any(f.spec.vxlan and f.spec.port == port for f in fans)

    # -- counters ----------------------------------------------------------------------
    def counter_blocks(self, fans: list[Fan]) -> dict[str, int]:
        """The loops' own: rx (IPIP), tx:DEVICE per queue, rx-vxlan:PORT per loop."""
        blocks = {"rx" + (f":q{q}" if q else ""): rx_block(q)
                  for q in range(max(1, len(self.rx_socks)))}
        for f in fans:
            blocks.update({f"tx:{f.device.name}" + (f":q{q}" if q else ""): tx_block(f.slot, q)
                           for q in range(len(_tun(f).fds))})
        for port, k in self.vxlan_blocks.items():
            blocks.update({f"rx-vxlan:{port}" + (f":q{q}" if q else ""): vxlan_rx_block(k, q)
                           for q in range(len(self.vxlan_socks[port]))})
        return blocks

    # -- the engine's tables -----------------------------------------------------------
    def set_local_macs(self, macs: frozenset) -> None:
        self.dp.set_local_macs(macs)

    def set_neighbours(self, entries) -> None:
        """(underlay address, ifindex, MAC) of the hosts frames may go to directly."""
        self.dp.set_neighbours(entries)

    def neighbours_used(self) -> list[int]:
        return self.dp.neighbours_used()

    def _install_table(self) -> None:
        rows = []
        for f in self.fans.values():
            u = f.underlay
            frames = self.packet_sock is not None and u.mac
            s = f.spec
            tun = _tun(f)
            rows.append(MapRow.of(s.map, u.mtu, tun.fd, u.name,
                                  u.index if frames else 0, u.mac if frames else b"",
                                  kind=s.type, vni=s.vni_value if s.vxlan else 0,
                                  port=s.port if s.vxlan else 0,
                                  dev_mac=mac_bytes(f.plumbing.bridge_mac) if s.vxlan else b"",
                                  queue_fds=tuple(tun.fds), dev_gso=tun.dev_gso))
        self.dp.install(rows)

    # -- loops -------------------------------------------------------------------------
    @staticmethod
    def _loop_names(fan: Fan) -> list[str]:
        return tx_loop_names(fan.device.name, len(_tun(fan).fds))

    def _start_tx(self, fan: Fan) -> None:
        assert self.sock is not None and self.counters is not None, "open() first"
        tun = _tun(fan)
        packet_fd = self.packet_sock.fileno() if self.packet_sock is not None else -1
        # the packet socket checks a virtio header as the TAP does (virtio_net_hdr_to_skb):
        # where the TAP's probe refused UDP_L4, a UDP GSO send would be refused too
        gso_fd = self.gso_sock.fileno() \
            if self.gso_sock is not None and tun.gso.get("udp_l4") else -1
        for q, (name, fd) in enumerate(zip(self._loop_names(fan), tun.fds)):
            self.dp.start_tx(name, fd, self.sock.fileno(), packet_fd,
                             self.counters.block(tx_block(fan.slot, q)), vxlan=fan.spec.vxlan,
                             gso_fd=gso_fd, dev_fd=tun.fd)

    def _sync_vxlan_ports(self) -> None:
        """One UDP socket and receive loop for each port a VXLAN fan uses, none for others.
        A port keeps the counter block it got when its loop started, for the loop's life."""
        ports = {f.spec.port for f in self.fans.values() if f.spec.vxlan}
        for port in [p for p in self.vxlan_socks if p not in ports]:
            for q, sock in enumerate(self.vxlan_socks.pop(port)):
                self.dp.stop_loop(vxlan_loop(port, q))
                sock.close()
            self.vxlan_blocks.pop(port)
        for port in sorted(ports - set(self.vxlan_socks)):
            assert self.counters is not None, "open() first"
            used = set(self.vxlan_blocks.values())
            k = min(k for k in range(MAX_FANS) if k not in used)   # fewer ports than fans
            self.vxlan_socks[port] = socks = open_vxlan_sockets(port, self.queues)
            self.vxlan_blocks[port] = k
            for q, sock in enumerate(socks):
                self.counters.zero(vxlan_rx_block(k, q))
                self.dp.start_rx_vxlan(vxlan_loop(port, q), port, sock.fileno(),
                                       self.counters.block(vxlan_rx_block(k, q)))

    # -- health ------------------------------------------------------------------------
    def check(self) -> None:
        self.dp.check()

    def ticks(self) -> dict[str, int]:
        return self.dp.ticks()

    def loops(self) -> dict[str, bool]:
        return {name: lt.thread.is_alive() for name, lt in list(self.dp.loops.items())}
