"""fanpkt-forward's lifecycle: bring fans up, serve (signals, neighbour refreshes, loop
health), reload on SIGHUP, and take everything down again.

Threads (docs/internals.md §2): one transmit loop per fan (its TUN or TAP -> the raw socket,
or the packet socket for resolved neighbours), one receive loop for IPIP (the raw socket
-> every IPIP fan's TUN) and one per VXLAN port (its UDP socket -> the TAPs of the VXLAN
fans on that port), all in fanpkt/engine.py. The main thread waits for signals and the kernel's
announcements, refreshes the neighbour table, and watches the loops: if one dies, the
process stops with an error, so that its supervisor restarts it.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Union

from pyroute2 import IPRoute

from . import control, heap, plumbing, privileges
from .config import MAX_FANS, MAX_QUEUES, FanSpec, check_table, default_queues
from .counters import kind
from .engine import COUNTER_BLOCK, COUNTER_NAMES, Dataplane, MapRow
from .errors import ConfigError, DeviceError, PrivilegeError
from .fanmap import ip
from .kernelpath import KernelFan, KernelPath, KernelPathError
from .kernelpath import cleanup as kernel_cleanup
from .neighbours import NeighbourWatch, bridge_macs
from .notify import Notifier, Watchdog
from .plumbing import Plumbing
from .netlink import link_index, mac_bytes
from .runstate import (CONTROL_SOCKET, N_BLOCKS, FanState, RunState, State, process_start,
                       rx_block, tx_block, vxlan_rx_block)
from .tun import Tun, check_tun_available
if TYPE_CHECKING:
    import socket

    from .metrics import Exporter
    from .runstate import Counters
from .underlay import (Interface, interface_of, open_packet_socket, open_receive_sockets,
                       open_socket, open_vxlan_sockets)

log = logging.getLogger("fanpkt")
NEIGH_REFRESH = 1.0         # seconds between neighbour table refreshes
NEIGH_EVENT_GAP = 0.2       # least time between refreshes the kernel's announcements cause
FOLLOW_REFRESH = 10.0       # seconds between unprompted looks for the underlay address's
                            # interface (an announcement prompts one at once)
TICK = 0.1                  # how long the main thread sleeps between looks at its events
MIN_OVERLAY_MTU = 68        # IPv4's least (RFC 791): a TUN or TAP takes no smaller
MAX_UNDERLAY_MTU = 65535    # an IPv4 packet's most


@dataclass
class Fan:
    spec: FanSpec
    slot: int
    underlay: Interface
    tun: Union[Tun, KernelFan]      # its device: the userspace engine's, or the kernel path's
    plumbing: Plumbing

    @property
    def datapath(self) -> str:
        """"kernel" (fanpkt/kernelpath.py) or "user" (the engine's loops)."""
        return "kernel" if isinstance(self.tun, KernelFan) else "user"

    @property
    def loop_names(self) -> list[str]:
        """Its transmit loops, one per device queue: tx-241, tx-241.1, ..."""
        base = f"tx-{self.tun.name[4:]}"
        return [base if q == 0 else f"{base}.{q}" for q in range(len(self.tun.fds))]

    @property
    def overlay_mtu(self) -> int:
        return self.underlay.mtu - self.spec.overhead

    def state(self) -> FanState:
        m = self.spec.map
        return FanState(device=self.tun.name, bridge=self.spec.bridge_name,
                        overlay=str(m.overlay_net), underlay=f"{ip(m.host)}/{m.underlay_len}",
                        slice=f"{ip(m.local_slice)}/{m.slice_len}", flags=self.spec.flags,
                        mtu=self.overlay_mtu, plumbing=self.plumbing.to_json(),
                        type=self.spec.type, port=self.spec.port if self.spec.vxlan else 0,
                        offloads=self.offloads(), datapath=self.datapath)

    def offloads(self) -> dict[str, bool]:
        """The offloads its device's writes (and, for VXLAN, its sends) may use: each GSO
        type, and whether the kernel took it when probed (tun.Tun.gso)."""
        return {f"gso_{name}": taken for name, taken in self.tun.gso.items()}


class Forwarder:
    def __init__(self, specs: list[FanSpec], check_spoof: bool = True,
                 run_dir: Optional[str] = None, config_path: Optional[str] = None,
                 send_frames: bool = True, queues: Optional[int] = None):
        self.specs = [s for s in specs if not s.off]
        self.check_spoof = check_spoof
        self.send_frames = send_frames
        self.queues = queues or default_queues()    # per device, and per VXLAN port
        self.config_path = config_path
        self.run = RunState.find(run_dir)
        self.fans: dict[tuple, Fan] = {}
        self.dp = Dataplane(check_spoof)
        self.kernel: Optional[KernelPath] = None    # the kernel path's fans, if any may use it
        self.kernel_error: Optional[str] = None     # why there is none
        self.counters: Optional[Counters] = None
        self.sock: Optional[socket.socket] = None
        self.packet_sock: Optional[socket.socket] = None
        self.gso_sock: Optional[socket.socket] = None   # VXLAN UDP GSO (a vnet-header socket)
        self.rx_socks: list = []                    # IPIP: self.sock, then one per loop
        self.vxlan_socks: dict[int, list] = {}      # UDP port -> its sockets, one per loop
        self.vxlan_blocks: dict[int, int] = {}      # UDP port -> k of its vxlan_rx_blocks
        self.neighbours: Optional[NeighbourWatch] = None
        self.neigh_entries: frozenset = frozenset()
        self.neigh_error: Optional[str] = None
        self.local_macs: frozenset = frozenset()    # the engine's (drop_rx_local_mac)
        self.macs_error: Optional[str] = None
        self.forward_before: Optional[str] = None
        self.stop_event = threading.Event()
        self.reload_wanted = threading.Event()
        self.exporter: Optional[Exporter] = None    # fanpkt/metrics.py's, with --metrics
        self.ctl: Optional[control.ControlServer] = None    # `fanpkt up`/`down`
        self.watchdog: Optional[Watchdog] = None    # serve()'s
        # systemd's notification socket, if any, taken out of the environment before
        # start() runs children (dnsmasq), which must not speak for this process
        self.notifier = Notifier.from_env()

    # -- bring up ----------------------------------------------------------------------
    def start(self) -> None:
        if not privileges.has_net_caps():
            raise PrivilegeError("fanpkt-forward must run as root: it creates TUN devices, "
                                 "routes and raw sockets (CAP_NET_ADMIN, CAP_NET_RAW)")
        check_tun_available()
        if not self.specs:
            raise ConfigError("no fan to bring up (every map is 'off' or none was given)")
        leftovers = self.run.acquire()
        try:
            if leftovers:
                # the kernel path's fans forwarded on while no forwarder ran: their devices
                # (and programs) go first, then what every fan had
                kernel_cleanup([f.device for f in leftovers.fans if f.datapath == "kernel"],
                               sorted({f.port for f in leftovers.fans
                                       if f.datapath == "kernel"}))
                plumbing.cleanup_leftovers([f.plumbing for f in leftovers.fans],
                                           leftovers.ip_forward_before, leftovers.pid,
                                           self.run.path)
                self.run.forget_leftovers()
            if any(s.vxlan and s.datapath != "user" for s in self.specs):
                try:
                    self._kernel_path()     # loaded now, while every capability is there
                except KernelPathError:
                    pass                    # each fan decides: auto falls back, kernel fails
            # before the first publish(): every fan `fanpkt show` lists, even while the
            # rest are still coming up, is one `fanpkt up` and `down` can reach (requests
            # wait in the listen backlog until serve())
            self.ctl = control.ControlServer(self.run.file(CONTROL_SOCKET), self._control)
            self.counters = self.run.create_counters(N_BLOCKS, COUNTER_BLOCK)
            self.sock = open_socket()
            if self.send_frames:
                self.packet_sock = open_packet_socket()
                try:
                    self.gso_sock = open_packet_socket(vnet_hdr=True)
                except OSError as e:    # no PACKET_VNET_HDR: frames one send each
                    log.warning("no virtio headers on packet sockets here (%s): VXLAN "
                                "frames are sent one by one", e.strerror)
                self.neighbours = NeighbourWatch()
            self.forward_before = plumbing.enable_forwarding()
            self.publish()
            for spec in self.specs:
                self._add_fan(spec)
            self._install_table()
            plumbing.nft_apply(self.specs)
            self.rx_socks = open_receive_sockets(self.sock, self.queues)
            for q, sock in enumerate(self.rx_socks):
                self.dp.start_rx("rx" if q == 0 else f"rx.{q}", sock.fileno(),
                                 self.counters.block(rx_block(q)))
            self._sync_vxlan_ports()
            for fan in self.fans.values():
                self._start_tx(fan)
            self.refresh_neighbours()
            self.refresh_local_macs()
            self.publish()
        except BaseException:
            self.stop()
            raise

    def _add_fan(self, spec: FanSpec) -> Fan:
        m = spec.map
        underlay = interface_of(m.host)
        underlay = underlay._replace(mtu=min(underlay.mtu, MAX_UNDERLAY_MTU))
        used = {f.slot for f in self.fans.values()}
        slot = min(set(range(MAX_FANS)) - used)     # check_table keeps fans <= MAX_FANS
        mtu = underlay.mtu - spec.overhead
        if mtu < MIN_OVERLAY_MTU:
            raise DeviceError(f"cannot bring up {m.overlay_net}: the underlay MTU "
                              f"{underlay.mtu} (on {underlay.name}) leaves {mtu} for the "
                              f"overlay, under IPv4's least, {MIN_OVERLAY_MTU}")
        tun = self._kernel_device(spec, slot, mtu) or \
            Tun(m.device_name, mtu, tap=spec.vxlan, queues=self.queues)
        try:
            rec = plumbing.attach(spec, tun.index, mtu, self.run.path)
            if isinstance(tun, KernelFan):
                try:
                    self._kernel_path().configure(tun, m, rec.bridge_mac)
                except BaseException:
                    plumbing.detach(rec)
                    raise
        except BaseException:
            tun.close()
            raise
        fan = Fan(spec, slot, underlay, tun, rec)
        self.fans[spec.key()] = fan
        for q in range(MAX_QUEUES):     # a kernel-path fan uses two
            self.counters.zero(tx_block(slot, q))
        self.publish()          # a crash from here on leaves a record of what to clean up
        log.info("up: %s over %s (%s%s), host %s, slice %s/%d, device %s%s", m.overlay_net,
                 m.underlay_net, spec.type,
                 f" vni {spec.vni_value} port {spec.port}, {fan.datapath} path"
                 if spec.vxlan else "",
                 ip(m.host), ip(m.local_slice), m.slice_len, tun.name,
                 f", bridge {spec.bridge_name}" if spec.bridge_name else "")
        return fan

    def _kernel_path(self) -> KernelPath:
        """The kernel path (its eBPF object loaded once); KernelPathError if it cannot be
        had here, the reason kept for the log lines of later fans."""
        if self.kernel is None:
            try:
                self.kernel = KernelPath(self.check_spoof)
            except KernelPathError as e:
                self.kernel_error = str(e)
                raise
        return self.kernel

    def _kernel_device(self, spec: FanSpec, slot: int, mtu: int) -> Optional[KernelFan]:
        """A VXLAN fan's device on the kernel path, or None for the userspace engine:
        datapath user, or auto where the kernel path cannot be had (the log says why in
        one line). datapath kernel fails instead (KernelPathError, exit status 4)."""
        if not spec.vxlan or spec.datapath == "user":
            return None
        try:
            if any(f.spec.vxlan and f.spec.port == spec.port and f.datapath == "user"
                   for f in self.fans.values()):    # their socket may not be open yet
                raise KernelPathError(f"UDP port {spec.port} serves userspace fans here")
            return self._kernel_path().create(slot, spec.map.device_name, spec.port,
                                              spec.vni_value, mtu)
        except KernelPathError as e:
            if spec.datapath == "kernel":
                raise KernelPathError(f"{spec.map.overlay_net}: no kernel data path: {e}") \
                    from None
            log.info("%s: on the userspace engine, since the kernel path cannot be set up "
                     "(%s)", spec.map.overlay_net, e)
            return None

    def _user_fans(self) -> list[Fan]:
        """The fans the userspace engine carries: its table, loops and sockets serve them
        and no other."""
        return [f for f in self.fans.values() if f.datapath == "user"]

    def refresh_kernel_counters(self) -> None:
        """Copy the kernel path's counters (per-CPU eBPF maps) into each of its fans' two
        counter blocks (publish: transmit counters in the first, receive in the second),
        where `fanpkt stats`, --watch and /metrics read every fan's; serve() does at every
        TICK. The datagrams of no fan (a VNI none has) count with the first kernel-path
        fan."""
        fans = sorted((f for f in self.fans.values() if isinstance(f.tun, KernelFan)),
                      key=lambda f: f.slot)
        if self.kernel is None or not fans or self.counters is None:
            return
        try:
            orphans = self.kernel.port_counters()
            for i, f in enumerate(fans):
                assert isinstance(f.tun, KernelFan)
                blocks = {"tx": self.counters.block(tx_block(f.slot, 0)),
                          "rx": self.counters.block(tx_block(f.slot, 1))}
                for name, value in self.kernel.counters(f.tun).items():
                    blocks[kind(name).direction][COUNTER_NAMES.index(name)] = \
                        value + (orphans[name] if i == 0 else 0)
        except KernelPathError as e:    # reading a map must not stop forwarding
            log.warning("%s", e)

    def _start_tx(self, fan: Fan) -> None:
        packet_fd = self.packet_sock.fileno() if self.packet_sock is not None else -1
        # the packet socket checks a virtio header as the TAP does (virtio_net_hdr_to_skb):
        # where the TAP's probe refused UDP_L4, a UDP GSO send would be refused too
        gso_fd = self.gso_sock.fileno() \
            if self.gso_sock is not None and fan.tun.gso.get("udp_l4") else -1
        for q, (name, fd) in enumerate(zip(fan.loop_names, fan.tun.fds)):
            self.dp.start_tx(name, fd, self.sock.fileno(), packet_fd,
                             self.counters.block(tx_block(fan.slot, q)), vxlan=fan.spec.vxlan,
                             gso_fd=gso_fd, dev_fd=fan.tun.fd)

    def _sync_vxlan_ports(self) -> None:
        """One UDP socket and receive loop for each port a VXLAN fan uses, none for others.
        A port keeps the counter block it got when its loop started, for the loop's life."""
        ports = {f.spec.port for f in self._user_fans() if f.spec.vxlan}
        for port in [p for p in self.vxlan_socks if p not in ports]:
            for q, sock in enumerate(self.vxlan_socks.pop(port)):
                self.dp.stop_loop(self._vxlan_loop(port, q))
                sock.close()
            self.vxlan_blocks.pop(port)
        for port in sorted(ports - set(self.vxlan_socks)):
            used = set(self.vxlan_blocks.values())
            k = min(k for k in range(MAX_FANS) if k not in used)   # fewer ports than fans
            self.vxlan_socks[port] = socks = open_vxlan_sockets(port, self.queues)
            self.vxlan_blocks[port] = k
            for q, sock in enumerate(socks):
                self.counters.zero(vxlan_rx_block(k, q))
                self.dp.start_rx_vxlan(self._vxlan_loop(port, q), port, sock.fileno(),
                                       self.counters.block(vxlan_rx_block(k, q)))

    @staticmethod
    def _vxlan_loop(port: int, q: int) -> str:
        return f"rx-vxlan-{port}" if q == 0 else f"rx-vxlan-{port}.{q}"

    def _install_table(self) -> None:
        rows = []
        for f in self._user_fans():
            u = f.underlay
            frames = self.packet_sock is not None and u.mac
            s = f.spec
            rows.append(MapRow.of(s.map, u.mtu, f.tun.fd, u.name,
                                  u.index if frames else 0, u.mac if frames else b"",
                                  kind=s.type, vni=s.vni_value if s.vxlan else 0,
                                  port=s.port if s.vxlan else 0,
                                  dev_mac=mac_bytes(f.plumbing.bridge_mac) if s.vxlan else b"",
                                  queue_fds=tuple(f.tun.fds), dev_gso=f.tun.dev_gso))
        self.dp.install(rows)

    def refresh_neighbours(self, follow: bool = True) -> None:
        """Follow each fan's underlay address to its interface (if follow), and bring the
        engine's neighbour table in line with the kernel's (fanpkt/neighbours.py)."""
        if self.neighbours is None or not self.fans:
            return
        fans = list(self.fans.values())
        try:
            moved = self.neighbours.follow({f.spec.map.host: f.underlay for f in fans}) \
                if follow else {}
            for f in fans:
                f.underlay = moved.get(f.spec.map.host, f.underlay)
            if moved:
                self._install_table()
            entries = self.neighbours.table([(f.spec.map, f.underlay) for f in fans],
                                            self.dp.neighbours_used())
        except Exception as e:      # netlink trouble must not stop forwarding
            if str(e) != self.neigh_error:
                log.warning("neighbour table refresh failed (%s); packets to hosts not yet "
                            "resolved go through the kernel's IP path", e)
                self.neigh_error = str(e)
            return
        self.neigh_error = None
        if entries != self.neigh_entries:
            self.dp.set_neighbours(entries)
            self.neigh_entries = entries

    def refresh_local_macs(self) -> None:
        """Bring the engine's set of this host's MACs on its VXLAN fan bridges in line
        with the bridges' forwarding databases (drop_rx_local_mac)."""
        names = {f.spec.bridge_name for f in self.fans.values() if f.spec.vxlan}
        if not names and not self.local_macs:
            return
        try:
            with IPRoute() as ipr:
                idxs = {link_index(ipr, n) for n in names} - {None}
                macs = bridge_macs(ipr, idxs) if idxs else frozenset()
        except Exception as e:      # noqa: BLE001 - netlink trouble must not stop forwarding
            if str(e) != self.macs_error:
                log.warning("cannot read the fan bridges' forwarding databases (%s)", e)
                self.macs_error = str(e)
            return
        self.macs_error = None
        if macs != self.local_macs:
            self.dp.set_local_macs(macs)
            if self.kernel is not None:
                self.kernel.set_local_macs(macs)
            self.local_macs = macs

    def publish(self) -> None:
        blocks = {"rx" + (f":q{q}" if q else ""): rx_block(q)
                  for q in range(max(1, len(self.rx_socks)))}
        for f in self.fans.values():
            blocks.update({f"tx:{f.tun.name}" + (f":q{q}" if q else ""): tx_block(f.slot, q)
                           for q in range(len(f.tun.fds))})
            if isinstance(f.tun, KernelFan):     # no loop: its blocks take the eBPF counters
                blocks.update({f"tx:{f.tun.name}": tx_block(f.slot, 0),
                               f"rx-kernel:{f.tun.name}": tx_block(f.slot, 1)})
        for port, k in self.vxlan_blocks.items():
            blocks.update({f"rx-vxlan:{port}" + (f":q{q}" if q else ""): vxlan_rx_block(k, q)
                           for q in range(len(self.vxlan_socks[port]))})
        self.run.write_state(State(
            pid=os.getpid(), config=self.config_path, check_spoof=self.check_spoof,
            ip_forward_before=self.forward_before, counter_names=COUNTER_NAMES,
            counter_block=COUNTER_BLOCK, counter_blocks=blocks,
            fans=[f.state() for f in self.fans.values()],
            started=process_start(os.getpid()) or 0))

    # -- reload ------------------------------------------------------------------------
    def reload(self, specs: list[FanSpec]) -> list[tuple[FanSpec, Exception]]:
        """Bring up added fans, take down removed ones; unchanged fans keep forwarding.
        Returns the added fans that failed to come up, with why (the others are up; a
        failed one left nothing behind, _bring_up)."""
        specs = [s for s in specs if not s.off]
        check_table(specs)
        wanted = {s.key(): s for s in specs}
        gone = [k for k in self.fans if k not in wanted]
        for k in gone:
            for name in self.fans[k].loop_names:
                self.dp.stop_loop(name)
        removed = [self.fans.pop(k) for k in gone]
        if removed:
            self._install_table()
        for fan in removed:
            self._remove_fan(fan)
        if removed:
            self.specs = [f.spec for f in self.fans.values()]
            self._sync_vxlan_ports()
            plumbing.nft_apply(self.specs)
        added, failed = [], []
        for key, spec in wanted.items():
            if key not in self.fans:
                try:
                    added.append(self._bring_up(spec))
                except Exception as e:      # one bad new fan must not stop the others
                    log.error("cannot bring up %s: %s", spec.map.overlay_net, e)
                    failed.append((spec, e))
        self.specs = [f.spec for f in self.fans.values()]
        self.refresh_local_macs()
        self.publish()
        heap.trim()             # what the old fans' buffers and loops held (fanpkt/heap.py)
        log.info("reloaded: %d fan(s) up, %d added, %d removed", len(self.fans), len(added),
                 len(removed))
        return failed

    def _bring_up(self, spec: FanSpec) -> Fan:
        """One fan added to a running forwarder, all or nothing: its device and plumbing,
        the table, its port's socket and receive loops, the nft rules, its transmit
        loops. If any step fails (the port taken, nft refusing, a bad MTU, ...) the fans,
        devices, loops and rules are put back as they were, so `fanpkt show` lists only
        fans that forward, and a retry really retries."""
        fan = self._add_fan(spec)           # on failure it leaves nothing itself
        try:
            self._install_table()
            self._sync_vxlan_ports()
            plumbing.nft_apply([f.spec for f in self.fans.values()])
            self._start_tx(fan)
        except BaseException:
            for name in fan.loop_names:
                self.dp.stop_loop(name)
            del self.fans[spec.key()]
            try:
                self._install_table()
                self._sync_vxlan_ports()
                plumbing.nft_apply([f.spec for f in self.fans.values()])
            except Exception as e:          # noqa: BLE001 - the first error is the one
                log.error("while taking %s down again: %s", spec.map.overlay_net, e)
            self._remove_fan(fan)
            self.publish()
            raise
        return fan

    def _remove_fan(self, fan: Fan) -> None:
        fan.tun.close()
        plumbing.detach(fan.plumbing)
        log.info("down: %s (%s)", fan.spec.map.overlay_net, fan.tun.name)

    # -- take down ---------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every loop and remove everything this run created. Safe to call twice."""
        if self.exporter is not None:   # first: a scrape reads what is removed below
            self.exporter.close()
            self.exporter = None
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None
        self.dp.stop()
        for fan in list(self.fans.values()):
            self._remove_fan(fan)
        self.fans.clear()
        if self.kernel is not None:
            self.kernel.stop()
            self.kernel = None
        for sock in self.rx_socks[1:]:
            sock.close()
        self.rx_socks = []
        if self.sock is not None:
            plumbing.nft_remove()
            self.sock.close()
            self.sock = None
        for sock in (self.packet_sock, self.gso_sock):
            if sock is not None:
                sock.close()
        self.packet_sock = self.gso_sock = None
        for socks in self.vxlan_socks.values():
            for sock in socks:
                sock.close()
        self.vxlan_socks.clear()
        if self.neighbours is not None:
            self.neighbours.close()
            self.neighbours = None
        if self.forward_before is not None:
            plumbing.restore_forwarding(self.forward_before)
            self.forward_before = None
        self.run.release()

    # -- the foreground process --------------------------------------------------------
    def _listen(self) -> list:
        """Doorbells for the kernel's neighbour, link and route announcements."""
        if self.neighbours is None:
            return []
        try:
            return self.neighbours.subscribe()
        except OSError as e:
            return self._deaf(e)

    @staticmethod
    def _deaf(e: OSError) -> list:
        log.warning("kernel change announcements unavailable (%s); the neighbour table is "
                    "refreshed once a second only", e)
        return []

    def handle_signals(self) -> None:
        """SIGTERM/SIGINT ask for a stop, SIGHUP for a reload. Installed before start():
        from the moment `fanpkt show` lists a fan, a SIGHUP (systemctl reload) must not
        kill the process, and a stop asked for during start is honoured once it is up."""
        signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload_wanted.set())

    def status(self) -> str:
        """systemd's STATUS= line."""
        return (f"forwarding {len(self.fans)} fan(s)"
                + "".join(f" {f.tun.name}" for f in self.fans.values()))

    @contextmanager
    def _busy(self):
        """A long change on the main thread: the watchdog keeps looking at the loops."""
        if self.watchdog is None:
            yield
            return
        with self.watchdog.busy(self.dp.ticks):
            yield

    def _control(self, req: dict) -> dict:
        with self._busy():
            reply = control.apply(self, req)
        self.notifier.send(f"STATUS={self.status()}")
        return reply

    def serve(self, load_config: Optional[Callable[[], list[FanSpec]]] = None) -> None:
        """Run until SIGTERM/SIGINT (or a loop dies: LoopError); SIGHUP re-reads the
        configuration file; `fanpkt up`/`down` arrive on the control socket. systemd
        hears READY=1 once every fan is up (start() has returned), and STOPPING=1."""
        self.handle_signals()
        watchdog = self.watchdog = Watchdog(self.notifier)
        log.info("forwarding (pid %d); SIGHUP reloads, SIGTERM stops", os.getpid())
        last_refresh = last_follow = time.monotonic()
        dirty = False
        try:
            ctl = self.ctl
            bells = self._listen()
            self.notifier.ready(self.status())
            while not self.stop_event.is_set():
                # A signal handler only sets an event: select() resumes after it, so a
                # stop is seen within TICK.
                ready = select.select(bells + ctl.fds(), [], [], TICK)[0]
                self.refresh_kernel_counters()      # at most TICK behind the eBPF maps
                self.dp.check()
                ctl.service(ready)
                watchdog.poll(self.dp.ticks())
                ready = [r for r in ready if r in bells]
                if ready:
                    try:
                        dirty |= self.neighbours.changed(ready)
                    except OSError as e:
                        bells, dirty = self._deaf(e), True
                since = time.monotonic() - last_refresh
                if since >= NEIGH_REFRESH or (dirty and since >= NEIGH_EVENT_GAP):
                    # Links, and routes (an address moving takes its local route along),
                    # ring the doorbells: following the underlay address unprompted is
                    # only the backstop, and at every refresh it was half of an idle
                    # forwarder's CPU.
                    follow = dirty or time.monotonic() - last_follow >= FOLLOW_REFRESH
                    self.refresh_neighbours(follow)
                    self.refresh_local_macs()
                    last_refresh, dirty = time.monotonic(), False
                    if follow:
                        last_follow = last_refresh
                if self.reload_wanted.is_set():
                    self.reload_wanted.clear()
                    if load_config is None:
                        log.info("SIGHUP: no configuration file to re-read")
                        continue
                    self.notifier.reloading()
                    try:
                        with self._busy():
                            self.reload(load_config())
                    except Exception as e:  # a bad file must not take the fans down
                        log.error("reload refused, keeping the running fans: %s", e)
                    self.notifier.ready(self.status())
        finally:
            log.info("stopping")
            self.notifier.stopping()
            self.stop()
            self.notifier.close()
            log.info("stopped; everything fanpkt created is removed")
