"""The one door to the compiled core, fanpkt._fastpath: the rows it takes, the counter
names, installing tables under running loops, and the threads the loops run in.

Importing this module without a built core raises BuildError (exit status 8), so every
other module imports the core through here and never directly.

Table swaps (docs/internals.md §2): the loops read the engine's table pointers once per
batch. Engine.load() and set_neighbours() swap in a new table and keep the old one;
install() then waits until every loop has ticked twice - each tick is a batch boundary,
so no loop can still hold the old pointer - and only then frees it.
"""
from __future__ import annotations

import array
import ctypes
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import BuildError, LoopError
from .fanmap import FanMap

try:
    from . import _fastpath as fastpath
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    raise BuildError(f"the compiled core fanpkt._fastpath is missing or broken ({e}); "
                     "build it with `pip install -e .` (needs Cython and a C compiler)") from None

log = logging.getLogger("fanpkt")

COUNTER_NAMES: list[str] = fastpath.counter_names()
COUNTER_BLOCK: int = int(fastpath.COUNTER_BLOCK)
# MapRow.dev_gso: the superpackets a TUN/TAP takes in a write (_fast/fanmap.pxd), by name
DEV_GSO_TYPES: dict[str, int] = dict(fastpath.DEV_GSO_TYPES)
DEV_GSO_ALL: int = sum(DEV_GSO_TYPES.values())
RETIRE_TICKS = 2            # ticks of every loop after a swap before the old table is freed
RETIRE_WARN = 5.0           # seconds before a slow loop is worth a warning
PR_SET_NAME = 15


@dataclass(frozen=True)
class MapRow:
    """One map as the engine holds it (struct fan_map in _fast/fanmap.pxd)."""
    overlay: int
    overlay_len: int
    underlay: int
    underlay_len: int
    local: int                  # this host's underlay address
    host_reserve: int
    mtu: int = 1500             # underlay MTU
    tun_fd: int = -1            # where decapsulated packets go; -1: nowhere (tests)
    ifname: str = ""            # underlay interface, asked for its MTU after EMSGSIZE
    ifindex: int = 0            # its index; 0: no frames to resolved neighbours
    mac: bytes = b""            # its MAC, the source of those frames (b"" with ifindex 0)
    kind: str = "ipip"          # or "vxlan"; then also:
    vni: int = 0                # the VXLAN network identifier
    port: int = 0               # the VXLAN UDP port
    dev_mac: bytes = b""        # the fan bridge's MAC (a frame from it coming back is ours)
    queue_fds: tuple = ()       # a multi-queue device's queues, tun_fd first; () = (tun_fd,)
    dev_gso: int = DEV_GSO_ALL  # the superpackets the device takes (tun.Offloads.dev_gso)

    @classmethod
    def of(cls, m: FanMap, mtu: int = 1500, tun_fd: int = -1, ifname: str = "",
           ifindex: int = 0, mac: bytes = b"", kind: str = "ipip", vni: int = 0,
           port: int = 0, dev_mac: bytes = b"", queue_fds: tuple = (),
           dev_gso: int = DEV_GSO_ALL) -> "MapRow":
        return cls(m.overlay, m.overlay_len, m.underlay, m.underlay_len, m.host,
                   m.host_reserve, mtu, tun_fd, ifname, ifindex, mac, kind, vni, port,
                   dev_mac, tuple(queue_fds), dev_gso)


def new_counters(blocks: int = 1) -> array.array:
    """Zeroed counter blocks in memory, for tests and benchmarks (the forwarder's live in
    the counter file, fanpkt/runstate.py)."""
    return array.array("Q", bytes(8 * COUNTER_BLOCK * blocks))


_libc = ctypes.CDLL(None)   # once: each CDLL() builds its own function-pointer types


COMM_LEN = 15      # the kernel keeps 15 characters of a thread's name (TASK_COMM_LEN - 1)


def kernel_name(loop: str) -> str:
    """The kernel's name for a loop's thread, unique within COMM_LEN characters, so that
    `top -H`, /proc/PID/task/*/comm and the benchmark tell every loop apart:
    `fanpkt-<loop>` where that fits (`fanpkt-tx-241`, `fanpkt-rx.1`), `rx-vxlan-` shortened
    to `rxv-` (`fanpkt-rxv-8472`); else the loop's name alone (`rxv-8472.1`, `tx-100-64`),
    and `tx-` shortened to `t` where even that is too long (a 15-character device's
    queue). Loop names are unique and none starts with `fanpkt-`, `rxv-` or a bare `t`."""
    short = "rxv-" + loop[len("rx-vxlan-"):] if loop.startswith("rx-vxlan-") else loop
    if len("fanpkt-" + short) <= COMM_LEN:
        return "fanpkt-" + short
    if len(short) > COMM_LEN and short.startswith("tx-"):
        short = "t" + short[len("tx-"):]
    return short[:COMM_LEN]


def set_thread_name(name: str) -> None:
    """The kernel's name for the calling thread (at most COMM_LEN characters kept)."""
    try:
        _libc.prctl(PR_SET_NAME, name[:COMM_LEN].encode(), 0, 0, 0)
    except AttributeError:
        pass


class LoopThread:
    """One forwarding loop: its stop flag and tick (fastpath.Loop) and the thread running
    it. A loop returns only when told to stop; if it returns otherwise, or raises, it is
    dead, and Dataplane.check() says so."""

    def __init__(self, name: str, target: Callable, *args):
        self.name = name
        self.loop = fastpath.Loop()
        self.stopping = False
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, args=(target, args),
                                       name=name, daemon=True)
        self.thread.start()

    def _run(self, target, args) -> None:
        set_thread_name(kernel_name(self.name))
        try:
            target(self.loop, *args)
        except BaseException as e:      # noqa: BLE001 - reported by check()
            self.error = e

    @property
    def dead(self) -> bool:
        return not self.stopping and not self.thread.is_alive()

    def stop(self) -> None:
        self.stopping = True
        self.loop.stop()
        self.thread.join()


class Dataplane:
    """The engine's tables and the loops that forward with them."""

    def __init__(self, check_spoof: bool = True):
        self.check_spoof = check_spoof
        self.engine = fastpath.Engine((), check_spoof)
        self.loops: dict[str, LoopThread] = {}

    # -- tables ------------------------------------------------------------------------
    def install(self, rows: list[MapRow]) -> None:
        self.engine.load(rows, self.check_spoof)
        self._retire()

    def set_neighbours(self, entries) -> None:
        """(underlay address, ifindex, MAC) of the hosts frames may go to directly."""
        self.engine.set_neighbours(entries)
        self._retire()

    def set_local_macs(self, macs) -> None:
        """This host's MACs on its fan bridges: frames from the wire with one as source
        are dropped (drop_rx_local_mac)."""
        self.engine.set_local_macs(macs)
        self._retire()

    def neighbours_used(self) -> list[int]:
        return self.engine.neighbours_used()

    def _retire(self) -> None:
        marks = [(lt, lt.loop.ticks) for lt in self.loops.values()]
        warn_at = time.monotonic() + RETIRE_WARN
        while any(lt.loop.ticks < t + RETIRE_TICKS and lt.thread.is_alive()
                  for lt, t in marks):
            time.sleep(0.01)
            if time.monotonic() > warn_at:
                log.warning("a forwarding loop is slow to pass a batch boundary; waiting")
                warn_at += RETIRE_WARN
        self.engine.retire()

    # -- loops -------------------------------------------------------------------------
    def start_tx(self, name: str, tun_fd: int, sock_fd: int, packet_fd: int,
                 counters, vxlan: bool = False, gso_fd: int = -1,
                 dev_fd: int = -1) -> LoopThread:
        """The transmit loop `name` of one TUN queue, or TAP queue for vxlan (see
        fastpath.run_tx); counters: its block; gso_fd: the vnet-header packet socket for
        VXLAN UDP GSO, or -1; dev_fd: the device's first queue, if tun_fd is another."""
        return self._start(name, fastpath.run_tx, tun_fd, sock_fd, packet_fd,
                           counters, vxlan, gso_fd if vxlan else -1, dev_fd)

    def start_rx(self, name: str, sock_fd: int, counters) -> LoopThread:
        """A receive loop `name` of IPIP, on one raw socket (its share, with several:
        underlay.share_filter), writing to every IPIP fan's TUN."""
        return self._start(name, fastpath.run_rx, sock_fd, counters)

    def start_rx_vxlan(self, name: str, port: int, sock_fd: int, counters) -> LoopThread:
        """A receive loop `name` of VXLAN UDP port `port` (one per socket of the port's
        SO_REUSEPORT group), writing to its fans' TAPs."""
        return self._start(name, fastpath.run_rx_vxlan, sock_fd, port, counters)

    def _start(self, name: str, run, *args) -> LoopThread:
        lt = LoopThread(name, lambda loop, *a: run(self.engine, loop, *a), *args)
        self.loops[name] = lt
        return lt

    def stop_loop(self, name: str) -> None:
        lt = self.loops.pop(name, None)
        if lt is not None:
            lt.stop()

    def stop(self) -> None:
        """Stop every loop: flags first, so they all wind down at once, then join."""
        for lt in self.loops.values():
            lt.stopping = True
            lt.loop.stop()
        for lt in self.loops.values():
            lt.thread.join()
        self.loops.clear()

    def ticks(self) -> dict[str, int]:
        """Every loop's tick: it advances at each wake-up, busy or idle (an idle loop's
        poll() times out every POLL_MS), so one that stops advancing is stuck."""
        return {name: lt.loop.ticks for name, lt in self.loops.items()}

    def check(self) -> None:
        """Raise LoopError if a loop has died."""
        for lt in self.loops.values():
            if lt.dead:
                why = f"{type(lt.error).__name__}: {lt.error}" if lt.error else "it returned"
                raise LoopError(f"forwarding loop {lt.name} died ({why}); stopping")
