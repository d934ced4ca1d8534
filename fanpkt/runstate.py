"""What a running forwarder publishes: a lock, state.json and the live counters.

One forwarder per network namespace, so the state directory is keyed by the namespace's
inode: `ip netns exec NS fanpkt stats` finds the forwarder of NS and no other. The
counters are a file the loops' uint64 blocks are mapped onto: readers see them live, and
the loops pay nothing to publish them.
"""
from __future__ import annotations

import fcntl
import json
import mmap
import os
from typing import Optional

import numpy as np

from .errors import AlreadyRunning, NotRunning

RUN_ROOT = "/run/fanpkt"
RX_BLOCK = 0                # block 0 is the receive loop; fan slot k transmits in block k + 1


def netns_dir(root: str = RUN_ROOT) -> str:
    return os.path.join(root, f"net-{os.stat('/proc/self/ns/net').st_ino}")


class RunState:
    def __init__(self, path: str):
        self.path = path
        self.lock_fd: Optional[int] = None
        self.counters: Optional[np.ndarray] = None
        self._mm: Optional[mmap.mmap] = None

    @classmethod
    def find(cls, run_dir: Optional[str] = None) -> "RunState":
        return cls(run_dir or netns_dir())

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    # -- the forwarder's side ----------------------------------------------------------
    def acquire(self) -> Optional[dict]:
        """Take the lock; return the state a crashed predecessor left, if any."""
        os.makedirs(self.path, mode=0o755, exist_ok=True)
        fd = os.open(self.file("lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = self._read_json("state.json", {}).get("pid", "?")
            raise AlreadyRunning(f"fanpkt-forward is already running in this network "
                                 f"namespace (pid {pid})") from None
        self.lock_fd = fd
        # Set a crashed run's state aside at once: `fanpkt show` must not list its fans as
        # running while they are being cleaned up. It stays until forget_leftovers().
        try:
            os.replace(self.file("state.json"), self.file("leftover.json"))
        except FileNotFoundError:
            pass
        return self._read_json("leftover.json", None)

    def forget_leftovers(self) -> None:
        """A crashed run's leftovers are cleaned up: drop its state."""
        try:
            os.unlink(self.file("leftover.json"))
        except FileNotFoundError:
            pass

    def create_counters(self, blocks: int, block_len: int) -> np.ndarray:
        size = blocks * block_len * 8
        fd = os.open(self.file("counters"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.counters = np.frombuffer(self._mm, dtype=np.uint64)
        return self.counters

    def write_state(self, state: dict) -> None:
        tmp = self.file("state.json.tmp")
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
        os.replace(tmp, self.file("state.json"))

    def release(self) -> None:
        """Remove everything published; the lock goes last, while still held."""
        if self.lock_fd is None:
            return
        for name in ("state.json", "counters", "lock"):
            try:
                os.unlink(self.file(name))
            except FileNotFoundError:
                pass
        self.counters = None            # the loops are gone; drop the view before the map
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass
        os.close(self.lock_fd)
        self.lock_fd = None
        try:
            os.rmdir(self.path)
        except OSError:
            pass

    # -- the readers' side -------------------------------------------------------------
    def _read_json(self, name: str, default):
        try:
            with open(self.file(name)) as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return default

    def is_running(self) -> bool:
        try:
            fd = os.open(self.file("lock"), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def read_state(self) -> dict:
        state = self._read_json("state.json", None)
        if state is None or not self.is_running():
            raise NotRunning("no fanpkt-forward is running in this network namespace")
        return state

    def read_counters(self) -> dict:
        state = self.read_state()
        names, block = state["counter_names"], state["counter_block"]
        with open(self.file("counters"), "rb") as f:
            raw = np.frombuffer(f.read(), dtype=np.uint64)
        loops = {}
        for loop, idx in state["counter_blocks"].items():
            vals = raw[idx * block: idx * block + len(names)]
            loops[loop] = {n: int(v) for n, v in zip(names, vals)}
        total = {n: sum(loop[n] for loop in loops.values()) for n in names}
        return {"pid": state["pid"], "total": total, "loops": loops}
