"""fanpkt-forward: brings fans up, runs the compiled loops, reloads on SIGHUP, and takes
everything down again.

Threads: one transmit loop per fan (its TUN -> the raw socket, or the packet socket for
resolved neighbours) and one receive loop (the raw socket -> every fan's TUN). The main
thread waits for signals and refreshes the neighbour table once a second and soon after
the kernel announces a neighbour, link or route change. The loops read
the engine's tables once per batch; a reload or a neighbour change installs a new table
and frees the old one only after every loop has ticked past a batch boundary.
"""
from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

from . import dhcp, plumbing
from .config import FanSpec, KernelResolver, check_table, make_spec, parse_file
from .errors import ConfigError, PrivilegeError
from .fanmap import ip, mask
from .native import COUNTER_BLOCK, COUNTER_NAMES, engine_row, fastpath
from .neighbours import NeighbourWatch
from .runstate import RX_BLOCK, RunState
from .tun import Tun, check_tun_available
from .underlay import Interface, interface_of, open_packet_socket, open_socket

log = logging.getLogger("fanpkt")
IPIP_OVERHEAD = 20
MAX_FANS = 16
NEIGH_REFRESH = 1.0         # seconds between neighbour table refreshes
NEIGH_EVENT_GAP = 0.2       # least time between refreshes the kernel's announcements cause
TICK = 0.1                  # how long the main thread sleeps between looks at its events


CAP_NET_ADMIN, CAP_NET_RAW = 12, 13
PR_SET_NAME = 15


def _set_thread_name(name: str) -> None:
    """The kernel's name for this thread (15 chars), so `top -H` and the benchmark can
    tell the transmit and receive loops apart."""
    import ctypes
    try:
        ctypes.CDLL(None).prctl(PR_SET_NAME, name[:15].encode(), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def has_net_caps() -> bool:
    """Effective CAP_NET_ADMIN and CAP_NET_RAW: what TUN, routes and raw sockets need
    (root normally has them; a container or setpriv may have taken them away)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                eff = int(line.split()[1], 16)
                return all(eff >> c & 1 for c in (CAP_NET_ADMIN, CAP_NET_RAW))
    return os.geteuid() == 0


@dataclass
class Fan:
    spec: FanSpec
    slot: int
    underlay: Interface
    tun: Tun
    plumbing: dict
    loop: object = None
    thread: Optional[threading.Thread] = None

    def describe(self) -> dict:
        m = self.spec.map
        return {"device": self.tun.name, "bridge": self.spec.bridge,
                "overlay": str(m.overlay_net), "underlay": f"{ip(m.host)}/{m.underlay_len}",
                "slice": f"{ip(m.local_slice)}/{m.slice_len}", "flags": self.spec.flags,
                "mtu": self.underlay.mtu - IPIP_OVERHEAD, "plumbing": self.plumbing}


class Forwarder:
    def __init__(self, specs: list[FanSpec], check_spoof: bool = True,
                 run_dir: Optional[str] = None, config_path: Optional[str] = None,
                 send_frames: bool = True):
        self.specs = [s for s in specs if not s.off]
        self.check_spoof = check_spoof
        self.send_frames = send_frames
        self.config_path = config_path
        self.run = RunState.find(run_dir)
        self.fans: dict[tuple, Fan] = {}
        self.engine = fastpath.Engine((), check_spoof)
        self.sock = None
        self.packet_sock = None
        self.neighbours: Optional[NeighbourWatch] = None
        self.neigh_entries: frozenset = frozenset()
        self.neigh_error: Optional[str] = None
        self.rx_loop = None
        self.rx_thread = None
        self.forward_before: Optional[str] = None
        self.stop_event = threading.Event()
        self.reload_wanted = threading.Event()

    # -- bring up ----------------------------------------------------------------------
    def start(self) -> None:
        if not has_net_caps():
            raise PrivilegeError("fanpkt-forward must run as root: it creates TUN devices, "
                                 "routes and raw sockets (CAP_NET_ADMIN, CAP_NET_RAW)")
        check_tun_available()
        if not self.specs:
            raise ConfigError("no fan to bring up (every map is 'off' or none was given)")
        leftovers = self.run.acquire()
        try:
            if leftovers:
                plumbing.cleanup_leftovers(leftovers)
                self.run.forget_leftovers()
            self.counters = self.run.create_counters(MAX_FANS + 1, COUNTER_BLOCK)
            self.sock = open_socket()
            if self.send_frames:
                self.packet_sock = open_packet_socket()
                self.neighbours = NeighbourWatch()
            self.forward_before = plumbing.enable_forwarding()
            self.publish()
            for spec in self.specs:
                self._add_fan(spec)
            self._install_table()
            plumbing.nft_apply(self.specs)
            self.rx_loop = fastpath.Loop()
            self.rx_thread = self._spawn("rx", fastpath.run_rx, self.engine, self.rx_loop,
                                         self.sock.fileno(), self._block(RX_BLOCK))
            for fan in self.fans.values():
                self._start_tx(fan)
            self.refresh_neighbours()
            self.publish()
        except BaseException:
            self.stop()
            raise

    def _block(self, idx: int):
        return self.counters[idx * COUNTER_BLOCK:(idx + 1) * COUNTER_BLOCK]

    def _spawn(self, name, target, *args) -> threading.Thread:
        def run():
            _set_thread_name(f"fanpkt-{name}")
            target(*args)
        t = threading.Thread(target=run, name=name, daemon=True)
        t.start()
        return t

    def _add_fan(self, spec: FanSpec) -> Fan:
        m = spec.map
        underlay = interface_of(m.host)
        used = {f.slot for f in self.fans.values()}
        slot = next(i for i in range(MAX_FANS) if i not in used)
        tun = Tun(m.device_name, underlay.mtu - IPIP_OVERHEAD)
        try:
            rec = plumbing.attach(spec, tun.index, underlay.mtu - IPIP_OVERHEAD)
        except BaseException:
            tun.close()
            raise
        if spec.dhcp and not spec.bridge:
            log.warning("%s: flag dhcp ignored: DHCP needs the fan on a bridge (add "
                        "'bridge NAME')", m.overlay_net)
        elif spec.dhcp:
            try:
                rec["dhcp"] = dhcp.start(spec, underlay.mtu - IPIP_OVERHEAD, self.run.path)
            except BaseException:
                plumbing.detach(rec)
                tun.close()
                raise
        fan = Fan(spec, slot, underlay, tun, rec)
        self.fans[spec.key()] = fan
        self._block(slot + 1)[:] = 0
        self.publish()          # a crash from here on leaves a record of what to clean up
        log.info("up: %s over %s, host %s, slice %s/%d, device %s%s", m.overlay_net,
                 m.underlay_net, ip(m.host), ip(m.local_slice), m.slice_len, tun.name,
                 f", bridge {spec.bridge}" if spec.bridge else "")
        return fan

    def _start_tx(self, fan: Fan) -> None:
        fan.loop = fastpath.Loop()
        packet_fd = self.packet_sock.fileno() if self.packet_sock is not None else -1
        fan.thread = self._spawn(f"tx-{fan.tun.name[4:]}", fastpath.run_tx, self.engine, fan.loop,
                                 fan.tun.fd, self.sock.fileno(), packet_fd,
                                 self._block(fan.slot + 1))

    def _install_table(self) -> None:
        rows = []
        for f in self.fans.values():
            u = f.underlay
            frames = self.packet_sock is not None and u.mac
            rows.append(engine_row(f.spec.map, u.mtu, f.tun.fd, u.name,
                                   u.index if frames else 0, u.mac if frames else b""))
        self.engine.load(rows, self.check_spoof)
        self._retire()

    def _retire(self) -> None:
        """Wait until no loop can still hold a table the engine replaced (each loop ticks
        once per wake-up, at least every 200 ms), then free it."""
        loops = [f.loop for f in self.fans.values() if f.loop is not None]
        if self.rx_loop is not None:
            loops.append(self.rx_loop)
        marks = [(lp, lp.ticks) for lp in loops]
        deadline = time.monotonic() + 5
        while any(lp.ticks < t + 2 for lp, t in marks):
            time.sleep(0.01)
            if time.monotonic() > deadline:
                log.warning("a forwarding loop is slow to pass a batch boundary; waiting")
                deadline += 5
        self.engine.retire()

    def refresh_neighbours(self) -> None:
        """Bring the engine's neighbour table in line with the kernel's, and have the
        kernel re-check the STALE entries frames went to (see fanpkt/neighbours.py). Also
        follow each fan's underlay address to the interface that holds it now: its MAC
        changes on a bond's failover, its index when the interface is re-created, and
        while no interface holds it no frames are sent."""
        if self.neighbours is None or not self.fans:
            return
        try:
            now = self.neighbours.underlays({f.spec.map.host for f in self.fans.values()})
            moved = False
            for f in self.fans.values():
                # The MTU stays the one the fan came up with: a lowered one is learnt from
                # EMSGSIZE, and the TUN's does not change under a running forwarder.
                u, n = f.underlay, now.get(f.spec.map.host)
                cur = u._replace(mac=b"") if n is None else n._replace(mtu=u.mtu)
                if cur != u:
                    f.underlay = cur
                    log.info("%s: underlay now %s (index %d), frames %s",
                             f.spec.map.overlay_net, cur.name, cur.index,
                             f"from {cur.mac.hex(':')}" if cur.mac else "off")
                    moved = True
            if moved:
                self._install_table()
            links: dict[int, set] = {}
            for f in self.fans.values():
                if f.underlay.mac:
                    m = f.spec.map
                    links.setdefault(f.underlay.index, set()).add(
                        (m.underlay, mask(m.underlay_len)))
            used = self.engine.neighbours_used()
            entries, stale = self.neighbours.scan(links)
            self.neighbours.confirm({a: stale[a] for a in used if a in stale})
        except Exception as e:      # netlink trouble must not stop forwarding
            if str(e) != self.neigh_error:
                log.warning("neighbour table refresh failed (%s); packets to hosts not yet "
                            "resolved go through the kernel's IP path", e)
                self.neigh_error = str(e)
            return
        self.neigh_error = None
        if entries != self.neigh_entries:
            self.engine.set_neighbours(entries)
            self._retire()
            self.neigh_entries = entries

    def publish(self) -> None:
        blocks = {"rx": RX_BLOCK}
        blocks.update({f"tx:{f.tun.name}": f.slot + 1 for f in self.fans.values()})
        self.run.write_state({
            "pid": os.getpid(), "config": self.config_path, "check_spoof": self.check_spoof,
            "fans": [f.describe() for f in self.fans.values()],
            "ip_forward_before": self.forward_before,
            "counter_names": COUNTER_NAMES, "counter_block": COUNTER_BLOCK,
            "counter_blocks": blocks})

    # -- reload ------------------------------------------------------------------------
    def reload(self, specs: list[FanSpec]) -> None:
        """Bring up added fans, take down removed ones; unchanged fans keep forwarding."""
        specs = [s for s in specs if not s.off]
        check_table(specs)
        wanted = {s.key(): s for s in specs}
        gone = [k for k in self.fans if k not in wanted]
        for k in gone:
            self._stop_tx(self.fans[k])
        removed = [self.fans.pop(k) for k in gone]
        if removed:
            self._install_table()
        for fan in removed:
            self._remove_fan(fan)
        added = []
        for key, spec in wanted.items():
            if key not in self.fans:
                try:
                    added.append(self._add_fan(spec))
                except Exception as e:      # one bad new fan must not stop the others
                    log.error("cannot bring up %s: %s", spec.map.overlay_net, e)
        self.specs = [f.spec for f in self.fans.values()]
        self._install_table()
        for fan in added:
            self._start_tx(fan)
        plumbing.nft_apply(self.specs)
        self.publish()
        log.info("reloaded: %d fan(s) up, %d added, %d removed", len(self.fans), len(added),
                 len(removed))

    def _stop_tx(self, fan: Fan) -> None:
        if fan.loop is not None:
            fan.loop.stop()
            fan.thread.join()

    def _remove_fan(self, fan: Fan) -> None:
        fan.tun.close()
        plumbing.detach(fan.plumbing)
        log.info("down: %s (%s)", fan.spec.map.overlay_net, fan.tun.name)

    # -- take down ---------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every loop and remove everything this run created. Safe to call twice."""
        for fan in self.fans.values():
            if fan.loop is not None:
                fan.loop.stop()
        if self.rx_loop is not None:
            self.rx_loop.stop()
        for fan in self.fans.values():
            if fan.thread is not None:
                fan.thread.join()
        if self.rx_thread is not None:
            self.rx_thread.join()
        for fan in list(self.fans.values()):
            self._remove_fan(fan)
        self.fans.clear()
        if self.sock is not None:
            plumbing.nft_remove()
            self.sock.close()
            self.sock = None
        if self.packet_sock is not None:
            self.packet_sock.close()
            self.packet_sock = None
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

    def serve(self, load_config=None) -> None:
        """Run until SIGTERM/SIGINT; SIGHUP re-reads the configuration file."""
        signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload_wanted.set())
        log.info("forwarding (pid %d); SIGHUP reloads, SIGTERM stops", os.getpid())
        last_refresh, dirty = time.monotonic(), False
        try:
            bells = self._listen()
            while not self.stop_event.is_set():
                # A signal handler only sets an event: select() resumes after it, so a
                # stop is seen within TICK.
                ready = select.select(bells, [], [], TICK)[0]
                if ready:
                    try:
                        dirty |= self.neighbours.changed(ready)
                    except OSError as e:
                        bells, dirty = self._deaf(e), True
                since = time.monotonic() - last_refresh
                if since >= NEIGH_REFRESH or (dirty and since >= NEIGH_EVENT_GAP):
                    self.refresh_neighbours()
                    last_refresh, dirty = time.monotonic(), False
                if self.reload_wanted.is_set():
                    self.reload_wanted.clear()
                    if load_config is None:
                        log.info("SIGHUP: no configuration file to re-read")
                        continue
                    try:
                        self.reload(load_config())
                    except ConfigError as e:
                        log.error("reload refused, keeping the running fans: %s", e)
        finally:
            log.info("stopping")
            self.stop()
            log.info("stopped; everything fanpkt created is removed")


def build_parser() -> argparse.ArgumentParser:
    from .cli import _Parser
    p = _Parser(prog="fanpkt-forward",
                description="Forward Fan overlay traffic over IPIP, in userspace.",
                epilog="Forms: fanpkt-forward -o 241.0.0.0/8 -u 172.16.3.4/16 [flags]; "
                       "fanpkt-forward 241.0.0.0/8 172.16.3.4/16 [flags]; "
                       "fanpkt-forward -c /etc/network/fan. Flags: dhcp, host-reserve N, "
                       "bridge NAME, nat, off.")
    p.add_argument("-o", "--overlay")
    p.add_argument("-u", "--underlay")
    p.add_argument("-c", "--config", help="a file in /etc/network/fan format")
    p.add_argument("--no-spoof-check", action="store_true",
                   help="accept IPIP whose inner source is not the sender's slice "
                        "(as the original kernel does)")
    p.add_argument("--underlay-send", choices=("frames", "ip"), default="frames",
                   help="frames (default): packets to underlay hosts the kernel has already "
                        "resolved go out as Ethernet frames through a packet socket, past the "
                        "host's IP output path (its OUTPUT/POSTROUTING firewall rules and "
                        "policy routes do not see them); ip: every packet through the "
                        "kernel's IP output path")
    p.add_argument("--run-dir", help="state directory (default: per network namespace)")
    p.add_argument("words", nargs="*", metavar="ARG", help="positional fanctl form and flags")
    p.set_defaults(func=run_forward)
    return p


def run_forward(args) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="fanpkt-forward: %(message)s")
    resolver = KernelResolver()
    load = None
    if args.config:
        if args.overlay or args.underlay or args.words:
            raise ConfigError("-c takes no map on the command line as well")
        path = args.config
        load = lambda: parse_file(path, resolver)  # noqa: E731
        specs = load()
    elif args.overlay or args.underlay:
        if not (args.overlay and args.underlay):
            raise ConfigError("give both -o OVERLAY and -u UNDERLAY")
        specs = [make_spec(args.overlay, args.underlay, args.words, resolver)]
    elif len(args.words) >= 2:
        specs = [make_spec(args.words[0], args.words[1], args.words[2:], resolver)]
    else:
        raise ConfigError("no fan given: use -o OVERLAY -u UNDERLAY, OVERLAY UNDERLAY, "
                          "or -c /etc/network/fan")
    check_table(specs)
    fwd = Forwarder(specs, check_spoof=not args.no_spoof_check, run_dir=args.run_dir,
                    config_path=args.config, send_frames=args.underlay_send == "frames")
    fwd.start()
    fwd.serve(load)
    return 0
