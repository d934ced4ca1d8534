"""fanpkt-forward's lifecycle: bring fans up, serve (signals, neighbour refreshes, loop
health), reload on SIGHUP, and take everything down again.

Each fan runs on a data path (fanpkt/datapath.py): the userspace engine's
(fanpkt/userpath.py, whose loops are the forwarder's threads, docs/internals.md §2) or, for
a VXLAN fan that can have it, the kernel path (fanpkt/kernelpath.py, §11). _install picks
one per fan; everything else speaks to a fan's path through the DataPath interface. The
main thread waits for signals and the kernel's announcements, refreshes the neighbour
table, and watches the paths' loops: if one dies, the process stops with an error, so that
its supervisor restarts it.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Optional

from pyroute2 import IPRoute

from . import control, heap, plumbing, privileges
from .config import MAX_FANS, MAX_QUEUES, FanSpec, check_table, default_queues
from .datapath import DataPath, Device, Fan
from .engine import COUNTER_BLOCK, COUNTER_NAMES
from .errors import ConfigError, DeviceError, PrivilegeError
from .fanmap import ip
from .kernelpath import KernelDataPath, KernelPathError
from .neighbours import NeighbourWatch, bridge_macs
from .notify import Notifier, Watchdog
from .netlink import link_index
from .runstate import CONTROL_SOCKET, N_BLOCKS, RunState, State, process_start, tx_block
from .underlay import interface_of
from .userpath import UserPath
if TYPE_CHECKING:
    from .metrics import Exporter
    from .runstate import Counters

log = logging.getLogger("fanpkt")
NEIGH_REFRESH = 1.0         # seconds between neighbour table refreshes
NEIGH_EVENT_GAP = 0.2       # least time between refreshes the kernel's announcements cause
FOLLOW_REFRESH = 10.0       # seconds between unprompted looks for the underlay address's
                            # interface (an announcement prompts one at once)
TICK = 0.1                  # how long the main thread sleeps between looks at its events
PATHS: tuple[type[DataPath], ...] = (KernelDataPath, UserPath)   # every kind there is
MIN_OVERLAY_MTU = 68        # IPv4's least (RFC 791): a TUN or TAP takes no smaller
MAX_UNDERLAY_MTU = 65535    # an IPv4 packet's most


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
        self.user = UserPath(check_spoof, self.queues)  # the engine: every IPIP fan's, and
                                                        # the VXLAN fans' the kernel's is not
        self.kernel: Optional[KernelDataPath] = None    # if any fan may use it
        self.kernel_error: Optional[str] = None         # why there is none
        self.counters: Optional[Counters] = None
        self.nft_touched = False                        # stop() resets fanpkt's nft rules
        self.neighbours: Optional[NeighbourWatch] = None
        self.neigh_entries: frozenset = frozenset()
        self.neigh_error: Optional[str] = None
        self.local_macs: frozenset = frozenset()    # every path's (drop_rx_local_mac)
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
        UserPath.check_host()
        if not self.specs:
            raise ConfigError("no fan to bring up (every map is 'off' or none was given)")
        leftovers = self.run.acquire()
        try:
            if leftovers:
                # what each path left (the kernel path's fans forwarded on while no
                # forwarder ran) goes first, then what every fan had
                for cls in PATHS:
                    cls.cleanup(leftovers.fans)
                plumbing.cleanup_leftovers([f.plumbing for f in leftovers.fans],
                                           leftovers.ip_forward_before, leftovers.pid,
                                           self.run.path)
                self.run.forget_leftovers()
            self._load_paths()      # now, while every capability is there
            # before the first publish(): every fan `fanpkt show` lists, even while the
            # rest are still coming up, is one `fanpkt up` and `down` can reach (requests
            # wait in the listen backlog until serve())
            self.ctl = control.ControlServer(self.run.file(CONTROL_SOCKET), self._control)
            self.counters = self.run.create_counters(N_BLOCKS, COUNTER_BLOCK)
            self.nft_touched = True
            self.user.open(self.counters, self.send_frames)
            if self.send_frames:
                self.neighbours = NeighbourWatch()
            self.forward_before = plumbing.enable_forwarding()
            self.publish()
            for spec in self.specs:
                self._add_fan(spec)
            plumbing.nft_apply(self.specs)
            for path in self._paths():      # the engine's IPIP receive loops even with
                path.start(self._fans_on(path))     # no fan of its own
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
        path, device = self._install(spec, slot, mtu)
        try:
            rec = plumbing.attach(spec, device.index, mtu, self.run.path)
        except BaseException:
            device.close()
            raise
        fan = Fan(spec, slot, underlay, device, rec, path)
        self.fans[spec.key()] = fan
        for q in range(MAX_QUEUES):     # a kernel-path fan uses two
            self.counters.zero(tx_block(slot, q))
        self.publish()          # a crash from here on leaves a record of what to clean up
        log.info("up: %s over %s (%s%s), host %s, slice %s/%d, device %s%s", m.overlay_net,
                 m.underlay_net, spec.type,
                 f" vni {spec.vni_value} port {spec.port}, {fan.datapath} path"
                 if spec.vxlan else "",
                 ip(m.host), ip(m.local_slice), m.slice_len, device.name,
                 f", bridge {spec.bridge_name}" if spec.bridge_name else "")
        return fan

    # -- the data paths: the one place that knows them apart -------------------------------
    def _install(self, spec: FanSpec, slot: int, mtu: int) -> tuple[DataPath, Device]:
        """The fan's data path, and its device there (DataPath.install): the kernel path
        for a VXLAN fan with datapath kernel, or auto where the kernel path can be set up;
        else the userspace engine (datapath user, IPIP, or auto's fallback, whose log line
        says why). datapath kernel fails instead (KernelPathError, exit status 4)."""
        if not spec.vxlan or spec.datapath == "user":
            return self.user, self.user.install(spec, slot, mtu)
        try:
            if self.user.holds_port(spec.port, self._fans_on(self.user)):
                raise KernelPathError(f"UDP port {spec.port} serves userspace fans here")
            kernel = self._kernel_path()
            return kernel, kernel.install(spec, slot, mtu)
        except KernelPathError as e:
            if spec.datapath == "kernel":
                raise KernelPathError(f"{spec.map.overlay_net}: no kernel data path: {e}") \
                    from None
            log.info("%s: on the userspace engine, since the kernel path cannot be set up "
                     "(%s)", spec.map.overlay_net, e)
            return self.user, self.user.install(spec, slot, mtu)

    def _load_paths(self) -> None:
        """The kernel path's eBPF object, loaded at start whatever the fans: loading needs
        capabilities the forwarder drops before it serves, and a VXLAN fan may come later
        (`fanpkt up`, a reload). A failure here is each fan's to judge in _install: auto
        falls back, kernel fails."""
        try:
            self._kernel_path()
        except KernelPathError:
            pass

    def _kernel_path(self) -> KernelDataPath:
        """The kernel path (its eBPF object loaded once); KernelPathError if it cannot be
        had here, the reason kept for the log lines of later fans (with capabilities
        dropped, a second try could only fail, and less clearly)."""
        if self.kernel_error is not None:
            raise KernelPathError(self.kernel_error)
        if self.kernel is None:
            try:
                self.kernel = KernelDataPath(self.check_spoof)
            except KernelPathError as e:
                self.kernel_error = str(e)
                raise
        return self.kernel

    def _paths(self) -> list[DataPath]:
        """Every data path this forwarder has: the engine always (IPIP's receive loops,
        the neighbour table), the kernel path once loaded."""
        return [self.user] + ([self.kernel] if self.kernel is not None else [])

    def _fans_on(self, path: DataPath) -> list[Fan]:
        return [f for f in self.fans.values() if f.path is path]

    def read_counters(self) -> None:
        """Every path's counters into its fans' counter blocks, where a path counts
        elsewhere (the kernel path's eBPF maps); serve() does at every TICK."""
        if self.counters is None:
            return
        for path in self._paths():
            path.read_counters(self._fans_on(path), self.counters)

    def ticks(self) -> dict[str, int]:
        """Every path's loops' ticks (the watchdog's)."""
        out: dict[str, int] = {}
        for path in self._paths():
            out.update(path.ticks())
        return out

    def loops(self) -> dict[str, bool]:
        """Every path's loops, and whether each runs (/metrics)."""
        out: dict[str, bool] = {}
        for path in self._paths():
            out.update(path.loops())
        return out

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
            for path in self._paths():
                on = [f for f in fans if f.spec.map.host in moved and f.path is path]
                if on:
                    path.replace(on)
            entries = self.neighbours.table([(f.spec.map, f.underlay) for f in fans],
                                            self.user.neighbours_used())
        except Exception as e:      # netlink trouble must not stop forwarding
            if str(e) != self.neigh_error:
                log.warning("neighbour table refresh failed (%s); packets to hosts not yet "
                            "resolved go through the kernel's IP path", e)
                self.neigh_error = str(e)
            return
        self.neigh_error = None
        if entries != self.neigh_entries:
            self.user.set_neighbours(entries)
            self.neigh_entries = entries

    def refresh_local_macs(self) -> None:
        """Bring every path's set of this host's MACs on its VXLAN fan bridges in line
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
            for path in self._paths():
                path.set_local_macs(macs)
            self.local_macs = macs

    def publish(self) -> None:
        blocks: dict[str, int] = {}
        for path in self._paths():
            blocks.update(path.counter_blocks(self._fans_on(path)))
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
        removed = [self.fans.pop(k) for k in list(self.fans) if k not in wanted]
        if removed:
            self._remove_fans(removed)
            self.specs = [f.spec for f in self.fans.values()]
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
        its path started with it (the engine's table, its port's socket and receive
        loops, its transmit loops; the kernel path's maps and programs), the nft rules. If
        any step fails (the port taken, nft refusing, a bad MTU, ...) the fans, devices,
        loops and rules are put back as they were, so `fanpkt show` lists only fans that
        forward, and a retry really retries."""
        fan = self._add_fan(spec)           # on failure it leaves nothing itself
        try:
            fan.path.start([fan])
            plumbing.nft_apply([f.spec for f in self.fans.values()])
        except BaseException:
            del self.fans[spec.key()]
            try:
                fan.path.remove([fan])
                plumbing.nft_apply([f.spec for f in self.fans.values()])
            except Exception as e:          # noqa: BLE001 - the first error is the one
                log.error("while taking %s down again: %s", spec.map.overlay_net, e)
            self._detach(fan)
            self.publish()
            raise
        return fan

    def _remove_fans(self, fans: list[Fan]) -> None:
        """Fans no longer in self.fans: off their paths, then their plumbing."""
        for path in self._paths():
            on = [f for f in fans if f.path is path]
            if on:
                path.remove(on)
        for fan in fans:
            self._detach(fan)

    @staticmethod
    def _detach(fan: Fan) -> None:
        plumbing.detach(fan.plumbing)
        log.info("down: %s (%s)", fan.spec.map.overlay_net, fan.device.name)

    # -- take down ---------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every loop and remove everything this run created. Safe to call twice."""
        if self.exporter is not None:   # first: a scrape reads what is removed below
            self.exporter.close()
            self.exporter = None
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None
        for path in self._paths():      # every loop stops first: the engine's come first
            path.stop(self._fans_on(path))
        for fan in list(self.fans.values()):
            self._detach(fan)
        self.fans.clear()
        self.kernel = None
        if self.nft_touched:
            plumbing.nft_remove()
            self.nft_touched = False
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
                + "".join(f" {f.device.name}" for f in self.fans.values()))

    @contextmanager
    def _busy(self):
        """A long change on the main thread: the watchdog keeps looking at the loops."""
        if self.watchdog is None:
            yield
            return
        with self.watchdog.busy(self.ticks):
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
                self.read_counters()        # at most TICK behind the eBPF maps
                for path in self._paths():
                    path.check()
                ctl.service(ready)
                watchdog.poll(self.ticks())
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
