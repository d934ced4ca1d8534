"""What a running forwarder publishes, and its layout: a lock, state.json and the live
counters. This module owns both formats; writers and readers go through it.

One forwarder per network namespace, so the state directory is keyed by the namespace's
inode: `ip netns exec NS fanpkt stats` finds the forwarder of NS and no other.

The counter file is an array of uint64 blocks of `counter_block` entries, one block per
loop: block rx_block(queue) for an IPIP receive loop, tx_block(slot, queue) for the transmit loop
of one queue of the fan in that slot, vxlan_rx_block(k, queue) for one receive loop of a
VXLAN port. The loops increment their block in place through the mapping, so
readers see the counters live and the loops pay nothing to publish them.
"""
from __future__ import annotations

import fcntl
import json
import mmap
import os
import stat
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from .config import MAX_FANS, MAX_QUEUES
from .errors import AlreadyRunning, ConfigError, NotRunning

RUN_ROOT = "/run/fanpkt"
RX_BLOCK = 0
CONTROL_SOCKET = "control"  # the forwarder's control socket (fanpkt/control.py)
LOCK_TRIES = 20             # x LOCK_WAIT: how long a start waits out a reader's brief lock
LOCK_WAIT = 0.005
NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC     # files in the run directory: never a symlink


def tx_block(slot: int, queue: int = 0) -> int:
    """The counter block of the transmit loop of queue `queue` of the fan in slot `slot`."""
    return 1 + slot * MAX_QUEUES + queue


def vxlan_rx_block(k: int, queue: int = 0) -> int:
    """The counter block of receive loop `queue` of the k-th VXLAN port (a port holds its
    k for its loops' life; there are never more ports than fans)."""
    return 1 + MAX_FANS * MAX_QUEUES + k * MAX_QUEUES + queue


def rx_block(queue: int = 0) -> int:
    """The counter block of IPIP receive loop `queue` (RX_BLOCK for the first)."""
    return RX_BLOCK if queue == 0 else vxlan_rx_block(MAX_FANS) + queue - 1


N_BLOCKS = rx_block(MAX_QUEUES)         # the counter file: every block above


def process_start(pid: int) -> Optional[int]:
    """When process pid started (clock ticks after boot, /proc/PID/stat field 22), or None
    if there is no such process. A pid and its start time name one process for good."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            stat_line = f.read()
    except (OSError, ValueError):
        return None
    try:    # the command name (field 2) may hold spaces and parentheses: skip past it
        return int(stat_line[stat_line.rindex(b")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def netns_dir(root: str = RUN_ROOT) -> str:
    return os.path.join(root, f"net-{os.stat('/proc/self/ns/net').st_ino}")


@dataclass
class FanState:
    """One running fan, as `fanpkt show` lists it and crash cleanup undoes it."""
    device: str
    bridge: Optional[str]
    overlay: str
    underlay: str               # this host's address with the underlay prefix
    slice: str
    flags: list[str]
    mtu: int                    # overlay MTU
    plumbing: dict              # plumbing.Plumbing.to_json()
    type: str = "ipip"          # or "vxlan"
    port: int = 0               # a VXLAN fan's UDP port (its receive loop's); 0 for IPIP
    offloads: dict[str, bool] = field(default_factory=dict)   # Fan.offloads()
    datapath: str = "user"      # a VXLAN fan's: "kernel" (kernelpath.py) or "user"


@dataclass
class State:
    """state.json."""
    pid: int
    config: Optional[str]
    check_spoof: bool
    ip_forward_before: Optional[str]
    counter_names: list[str]
    counter_block: int
    counter_blocks: dict[str, int] = field(default_factory=dict)   # loop name -> block
    fans: list[FanState] = field(default_factory=list)
    started: int = 0            # process_start(pid): tells the forwarder from a later
                                # process that got its pid after a crash

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "State":
        d = dict(d)
        d["fans"] = [FanState(**f) for f in d.get("fans", [])]
        return cls(**d)


class Counters:
    """The mapped counter file: block(i) is a live uint64 view of loop block i."""

    def __init__(self, mm: mmap.mmap, block_len: int):
        self._mm = mm
        self.block_len = block_len
        self._view = memoryview(mm).cast("Q")

    def raw(self) -> bytes:
        """A copy of the whole file, as a reader reading it would get."""
        return self._mm[:]

    def block(self, idx: int) -> memoryview:
        return self._view[idx * self.block_len:(idx + 1) * self.block_len]

    def zero(self, idx: int) -> None:
        start = idx * self.block_len * 8
        self._mm[start:start + self.block_len * 8] = bytes(self.block_len * 8)

    def close(self) -> None:
        self._view.release()
        try:
            self._mm.close()
        except BufferError:         # a loop's view is still alive; the map goes with it
            pass


def loop_fans(state: State) -> dict[str, list[str]]:
    """The fans (devices) each loop counts for: a transmit loop its own fan, the IPIP
    receive loop every IPIP fan, a VXLAN port's receive loop the VXLAN fans on that port.
    A receive loop's counters are its fans' together: it cannot tell them apart. A fan on
    the kernel path has no loop: its eBPF counters fill `tx:<device>` and
    `rx-kernel:<device>`, its own."""
    ipip = [f.device for f in state.fans if f.type != "vxlan"]
    out = {}
    for loop in state.counter_blocks:
        kind, _, name = loop.partition(":")
        name = name.split(":")[0]       # "tx:fan-241:q1": queue 1's loop of fan-241
        out[loop] = ([name] if kind in ("tx", "rx-kernel") else ipip if kind == "rx" else
                     [f.device for f in state.fans if f.type == "vxlan" and str(f.port) == name])
    return out


def device_drops(dev: str) -> dict:
    """What the kernel dropped at a fan's TUN/TAP: tx_dropped are packets routed into it
    that its queue had no room for (the transmit loops fell behind: fanpkt never saw
    them); rx_dropped, packets the forwarder wrote that the stack refused."""
    out = {}
    for key in ("tx_dropped", "rx_dropped"):
        try:
            with open(f"/sys/class/net/{dev}/statistics/{key}") as f:
                out[key] = int(f.read())
        except (OSError, ValueError):
            out[key] = None         # the device is going away, or no sysfs here
    return out


def totals(state: State, raw: bytes) -> dict:
    """Counters per loop and in total, from the counter file's bytes, and which fans each
    loop counts for."""
    vals = memoryview(raw).cast("Q")
    names, block = state.counter_names, state.counter_block
    loops = {}
    for loop, idx in state.counter_blocks.items():
        loops[loop] = {n: int(vals[idx * block + k]) for k, n in enumerate(names)
                       if idx * block + k < len(vals)}
    total = {n: sum(loop.get(n, 0) for loop in loops.values()) for n in names}
    return {"pid": state.pid, "total": total, "loops": loops, "loop_fans": loop_fans(state),
            "fans": [{"device": f.device, "type": f.type, "overlay": f.overlay,
                      "flags": f.flags, "offloads": f.offloads, "datapath": f.datapath}
                     for f in state.fans],
            "devices": {f.device: device_drops(f.device) for f in state.fans}}


class RunState:
    def __init__(self, path: str):
        self.path = path
        self.lock_fd: Optional[int] = None
        self.counters: Optional[Counters] = None
        self.state: Optional[State] = None      # the forwarder's last published state

    @classmethod
    def find(cls, run_dir: Optional[str] = None) -> "RunState":
        return cls(run_dir or netns_dir())

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    # -- the forwarder's side ----------------------------------------------------------
    def _check_directory(self) -> None:
        """Root acts on what it finds here (it deletes the interfaces a leftover record
        names): the run directory and its parent must be real directories that only their
        owner, this user, can write."""
        os.makedirs(self.path, mode=0o755, exist_ok=True)
        for d in (self.path, os.path.dirname(os.path.abspath(self.path))):
            st = os.lstat(d)
            if not stat.S_ISDIR(st.st_mode):
                raise ConfigError(f"run directory {d} is not a directory (a symlink?)")
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                raise ConfigError(f"run directory {d} must belong to uid {os.geteuid()} and "
                                  f"be writable by it alone (it is uid {st.st_uid}, mode "
                                  f"{stat.S_IMODE(st.st_mode):o})")

    def acquire(self) -> Optional[State]:
        """Take the lock; return the state a crashed predecessor left, if any."""
        self._check_directory()
        path = self.file("lock")
        for _ in range(LOCK_TRIES):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o600)
            except OSError as e:
                raise ConfigError(f"cannot open {path}: {e.strerror}") from None
            os.fchmod(fd, 0o600)    # 0644 from an older fanpkt: nobody else may hold it
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)        # a forwarder, or for a moment `fanpkt show`
                time.sleep(LOCK_WAIT)
                continue
            # A stopping forwarder unlinks the lock before it lets go: a lock on that old
            # file is no lock at all once another start has made a new one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            state = self._read_state("state.json")
            raise AlreadyRunning(f"fanpkt-forward is already running in this network "
                                 f"namespace (pid {state.pid if state else '?'})")
        self.lock_fd = fd
        # Set a crashed run's state aside at once: `fanpkt show` must not list its fans as
        # running while they are being cleaned up. It stays until forget_leftovers().
        try:
            os.replace(self.file("state.json"), self.file("leftover.json"))
        except FileNotFoundError:
            pass
        return self._read_state("leftover.json")

    def forget_leftovers(self) -> None:
        """A crashed run's leftovers are cleaned up: drop its state."""
        try:
            os.unlink(self.file("leftover.json"))
        except FileNotFoundError:
            pass

    def create_counters(self, blocks: int, block_len: int) -> Counters:
        size = blocks * block_len * 8
        fd = os.open(self.file("counters"), os.O_RDWR | os.O_CREAT | os.O_TRUNC | NOFOLLOW,
                     0o644)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.counters = Counters(mm, block_len)
        return self.counters

    def write_state(self, state: State) -> None:
        tmp = self.file("state.json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | NOFOLLOW, 0o644)
        with open(fd, "w") as f:
            json.dump(state.to_json(), f, indent=1)
        os.replace(tmp, self.file("state.json"))
        self.state = state

    def snapshot(self) -> Optional[dict]:
        """The forwarder's own reading of its counters, as `fanpkt stats --json` reads
        them (totals()); None before the first publish or after release."""
        state, counters = self.state, self.counters
        if state is None or counters is None:
            return None
        raw = counters.raw()
        return totals(state, raw)

    def release(self) -> None:
        """Remove everything published; the lock goes last, while still held."""
        if self.lock_fd is None:
            return
        for name in (CONTROL_SOCKET, "state.json", "counters", "lock"):
            try:
                os.unlink(self.file(name))
            except FileNotFoundError:
                pass
        if self.counters is not None:   # the loops are gone by now
            self.counters.close()
            self.counters = None
        os.close(self.lock_fd)
        self.lock_fd = None
        try:
            os.rmdir(self.path)
        except OSError:
            pass

    # -- the readers' side -------------------------------------------------------------
    def _read_state(self, name: str) -> Optional[State]:
        """The record, or None when there is none to trust: missing, unreadable (the run
        directory given is a file, say) or not one the forwarder wrote."""
        try:
            with open(self.file(name)) as f:
                return State.from_json(json.load(f))
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None

    # Readers take no lock: a reader that held one, however briefly, could keep a start
    # out (and a user able to open the lock could hold it forever). The forwarder removes
    # state.json before it lets go of the lock; after a crash the file stays, naming a
    # process that is gone, or a pid that another process got later (its start time tells).
    @staticmethod
    def _alive(state: State) -> bool:
        started = process_start(state.pid)
        return started is not None and state.started in (0, started)

    def is_running(self) -> bool:
        state = self._read_state("state.json")
        return state is not None and self._alive(state)

    def read_state(self) -> State:
        state = self._read_state("state.json")
        if state is None or not self._alive(state):
            raise NotRunning("no fanpkt-forward is running in this network namespace")
        return state

    def read_counters(self) -> dict:
        state = self.read_state()
        try:
            with open(self.file("counters"), "rb") as f:
                raw = f.read()
        except OSError:     # it stopped between the two reads
            raise NotRunning("no fanpkt-forward is running in this network namespace") \
                from None
        return totals(state, raw[:len(raw) - len(raw) % 8])
