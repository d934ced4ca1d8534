"""What systemd learns from a running forwarder (sd_notify(3), Type=notify): READY=1 once
every fan is up, RELOADING=1/READY=1 around a SIGHUP reload, STOPPING=1 when it stops, and
WATCHDOG=1 while every forwarding loop still makes progress (docs/internals.md §2).

sd_notify is one datagram of `KEY=VALUE` lines to the AF_UNIX socket named by
$NOTIFY_SOCKET (a leading '@' names an abstract socket); a few lines here, so no libsystemd
binding is needed. Without $NOTIFY_SOCKET (not under systemd) every call does nothing.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, MutableMapping, Optional

log = logging.getLogger("fanpkt")
MIN_LOOK = 0.5              # s: shortest sound ping interval, > POLL_MS (fastpath.pyx) twice
BUSY_MAX = 300.0            # s: the longest the main thread may be busy (a reload) and still
                            # ping: past it the pings stop, and systemd restarts a hung one


class Notifier:
    """The service manager's notification socket, if there is one."""

    def __init__(self, address: Optional[str], watchdog_usec: int = 0):
        self.address = address
        self.watchdog_usec = watchdog_usec
        self.sock: Optional[socket.socket] = None
        self.failed = False
        if address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_env(cls, env: MutableMapping[str, str] = os.environ) -> "Notifier":
        """Read and remove NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID, as
        sd_notify(unset_environment=1) does: the forwarder's children (dnsmasq) must not
        speak for it. The watchdog is ours only if WATCHDOG_PID is unset or our pid."""
        address = env.pop("NOTIFY_SOCKET", None)
        usec, pid = env.pop("WATCHDOG_USEC", ""), env.pop("WATCHDOG_PID", "")
        watchdog = int(usec) if usec.isdigit() else 0
        if pid and pid != str(os.getpid()):
            watchdog = 0
        return cls(address or None, watchdog)

    def send(self, *lines: str) -> None:
        """One notification; a failure is logged once and otherwise ignored, as sd_notify
        does (systemd going away must not stop forwarding). It never waits: a listener
        that stops reading fills its queue (net.unix.max_dgram_qlen, 10 by default), and a
        blocking send would then stop the main thread, and with it `fanpkt up`/`down`,
        reloads and the neighbour refresh; the notification is dropped instead."""
        if self.sock is None:
            return
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        try:
            self.sock.sendto("\n".join(lines).encode(), socket.MSG_DONTWAIT, addr)
        except OSError as e:
            if not self.failed:
                log.warning("cannot notify systemd at %s (%s)", self.address, e)
                self.failed = True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC: what Type=notify-reload (systemd 253) wants with RELOADING=1
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Watchdog:
    """WATCHDOG=1 every half of WATCHDOG_USEC, but only while every forwarding loop has
    ticked since the last look: a loop stuck in a batch (or the main thread stuck) stops
    the pings, and systemd restarts the process. An idle loop ticks every POLL_MS (its
    poll() times out), so idleness never looks like a stall."""

    def __init__(self, notifier: Notifier):
        self.notifier = notifier
        self.interval = notifier.watchdog_usec / 2e6        # seconds; 0: no watchdog
        self.next_look = 0.0
        self.marks: dict[str, int] = {}
        self.stalled: list[str] = []
        if self.interval and self.interval < MIN_LOOK:
            log.warning("WatchdogSec=%.1fs is too short to tell an idle loop (it wakes every "
                        "0.2 s) from a stuck one; use 2 s or more", 2 * self.interval)

    def poll(self, ticks: Mapping[str, int], now: Optional[float] = None) -> bool:
        """Called often from the main thread with every loop's tick; pings when due and
        every loop has moved. Returns True if it pinged."""
        if not self.interval:
            return False
        now = time.monotonic() if now is None else now
        if now < self.next_look:
            return False
        self.next_look = now + self.interval
        # a loop that is new since the last look (a fan brought up) counts as moving
        stalled = sorted(name for name, t in ticks.items() if self.marks.get(name, -1) == t)
        self.marks = dict(ticks)
        if stalled != self.stalled:
            if stalled:
                log.error("forwarding loop(s) %s made no progress for %.1f s; withholding "
                          "the watchdog ping", ", ".join(stalled), self.interval)
            else:
                log.info("every forwarding loop is moving again; watchdog pings resume")
            self.stalled = stalled
        if stalled:
            return False
        self.notifier.send("WATCHDOG=1")
        return True

    @contextmanager
    def busy(self, ticks: Callable[[], Mapping[str, int]],
             limit: float = BUSY_MAX) -> Iterator[None]:
        """While the main thread is busy with something long but bounded (a reload: nft
        may take 30 s, each dhcp fan's dnsmasq 5 s), a helper thread looks at the loops
        instead, so systemd does not restart a forwarder whose loops all move; for at
        most `limit` seconds, so a reload that hangs still stops the pings."""
        if not self.interval:
            yield
            return
        done = threading.Event()

        def look() -> None:
            end = time.monotonic() + limit
            while not done.wait(min(self.interval, MIN_LOOK)) and time.monotonic() < end:
                try:
                    self.poll(ticks())
                except RuntimeError:    # the loop table changed under us: next look
                    pass

        t = threading.Thread(target=look, name="watchdog", daemon=True)
        t.start()
        try:
            yield
        finally:
            done.set()
            t.join()
