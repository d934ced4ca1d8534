"""What systemd hears from fanpkt-forward (fanpkt/notify.py): READY=1 once every fan is up,
RELOADING=1/READY=1 around a SIGHUP, STOPPING=1, and WATCHDOG=1 only while every loop
moves. systemd is not PID 1 on the machines these tests run on, so each test owns the
$NOTIFY_SOCKET datagram socket systemd would, and reads what arrives on it."""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager

import pytest

from fanpkt.notify import Notifier

from lab import FANPKT, nsx, ping, poll

H1 = "172.16.1.1"
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
PTRACE_DETACH, PTRACE_SEIZE, PTRACE_INTERRUPT = 17, 0x4206, 0x4207
WALL = 0x40000000               # waitpid's __WALL: wait for a thread, not only a process


@pytest.fixture
def notify_socket(tmp_path):
    """The datagram socket systemd listens on; removed after the test."""
    path = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    try:
        yield s, path
    finally:
        s.close()
        os.unlink(path)


def receive(s, timeout=20) -> dict:
    """The next notification as a dict of its KEY=VALUE lines."""
    s.settimeout(timeout)
    return dict(line.split("=", 1) for line in s.recv(4096).decode().splitlines())


def drain(s) -> list[dict]:
    s.setblocking(False)
    out = []
    try:
        while True:
            out.append(dict(ln.split("=", 1) for ln in s.recv(4096).decode().splitlines()))
    except BlockingIOError:
        return out


def test_a_listener_that_stops_reading_never_blocks_the_forwarder(notify_socket, caplog):
    """Its queue holds net.unix.max_dgram_qlen datagrams; past that a send must fail at
    once (dropped, logged once), not wait: the main thread sends them."""
    s, path = notify_socket
    n = Notifier(path)
    done = threading.Event()

    def flood():
        for k in range(200):
            n.send(f"STATUS={k}")
        done.set()

    t = threading.Thread(target=flood, daemon=True)
    with caplog.at_level(logging.WARNING, logger="fanpkt"):
        t.start()
        assert done.wait(10), "a send blocked on the full socket"
    n.close()
    got = drain(s)
    assert 0 < len(got) < 200 and got[0] == {"STATUS": "0"}
    assert [r.getMessage() for r in caplog.records
            if "cannot notify" in r.getMessage()] == [
        f"cannot notify systemd at {path} ([Errno 11] Resource temporarily unavailable)"]


def test_notifier_reads_and_unsets_the_environment():
    name = f"fpo-notify-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)                 # abstract: nothing left on disk
    try:
        env = {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "4000000",
               "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}
        n = Notifier.from_env(env)
        assert env == {"PATH": "/bin"} and n.watchdog_usec == 4000000
        n.ready("forwarding 0 fan(s)")
        assert receive(s, 2) == {"READY": "1", "STATUS": "forwarding 0 fan(s)"}
        n.close()
    finally:
        s.close()
    other = Notifier.from_env({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "4000000",
                               "WATCHDOG_PID": "1"})
    assert other.watchdog_usec == 0     # another process's watchdog
    Notifier.from_env({}).ready("x")    # not under systemd: nothing, no error


def dnsmasq_environ(ns) -> bytes:
    for pid in nsx(ns, "ip", "netns", "pids", ns).stdout.split():
        with open(f"/proc/{pid}/comm") as f:
            if f.read().strip() == "dnsmasq":
                with open(f"/proc/{pid}/environ", "rb") as f:
                    return f.read()
    raise AssertionError("no dnsmasq")


def test_ready_once_every_fan_is_up_reloading_stopping(lab, tmp_path, notify_socket):
    s, path = notify_socket
    h1 = lab.host("h1", H1)
    conf = tmp_path / "fan"
    conf.write_text(f"241.0.0.0/8 {H1}/16\n10.0.0.0/8 {H1}/16 bridge fb10 dhcp\n")
    p = lab.forward(h1, "-c", str(conf), wait=False, env={"NOTIFY_SOCKET": path})
    msg = receive(s)
    # READY=1 is the first word, and by then every fan is up: devices, the bridge's
    # dnsmasq, the published state, the control socket
    assert msg == {"READY": "1", "STATUS": "forwarding 2 fan(s) fan-241 fan-10"}
    assert [line.split()[2] for line in
            nsx(h1, *FANPKT, "show").stdout.splitlines()[1:]] == ["241.0.0.0/8", "10.0.0.0/8"]
    assert b"NOTIFY_SOCKET" not in dnsmasq_environ(h1)    # children do not speak for it
    nsx(h1, *FANPKT, "up", "-o", "250.0.0.0/8", "-u", f"{H1}/16")
    assert receive(s) == {"STATUS": "forwarding 3 fan(s) fan-241 fan-10 fan-250"}

    conf.write_text(f"241.0.0.0/8 {H1}/16\n")
    p.send_signal(signal.SIGHUP)
    msg = receive(s)
    assert msg.pop("RELOADING") == "1" and int(msg.pop("MONOTONIC_USEC")) > 0 and not msg
    assert receive(s) == {"READY": "1", "STATUS": "forwarding 1 fan(s) fan-241"}
    assert ping(h1, "241.1.1.1").returncode == 0

    p.send_signal(signal.SIGTERM)
    assert receive(s) == {"STOPPING": "1", "STATUS": "stopping"}
    assert p.wait(20) == 0
    assert drain(s) == []


def thread_of(ns, name) -> int:
    """The tid of the forwarder's thread the kernel calls name."""
    for pid in nsx(ns, "ip", "netns", "pids", ns).stdout.split():
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().strip() == name:
                    return int(tid)
    raise AssertionError(f"no thread {name}")


@contextmanager
def frozen(tid):
    """Stop one thread and no other (PTRACE_SEIZE + PTRACE_INTERRUPT: a ptrace stop is
    per thread, where SIGSTOP stops the whole process): a loop stuck as a deadlock or a
    hung system call would leave it, while the main thread runs on."""
    if libc.ptrace(PTRACE_SEIZE, tid, None, None) != 0:
        raise OSError(ctypes.get_errno(), f"PTRACE_SEIZE {tid}")
    try:
        assert libc.ptrace(PTRACE_INTERRUPT, tid, None, None) == 0
        got, status = os.waitpid(tid, WALL)
        assert got == tid and os.WIFSTOPPED(status)
        yield
    finally:
        libc.ptrace(PTRACE_DETACH, tid, None, None)


def pings(s, seconds) -> int:
    """WATCHDOG=1 messages that arrive within the next `seconds`."""
    n, deadline = 0, time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            n += receive(s, left).get("WATCHDOG") == "1"
        except socket.timeout:
            break
    return n


def test_watchdog_pings_stop_while_a_loop_is_stuck(lab, notify_socket):
    s, path = notify_socket
    h1 = lab.host("h1", H1)
    p = lab.forward(h1, "-o", "241.0.0.0/8", "-u", f"{H1}/16",
                    env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    got = []                                            # one every 0.5 s, idle as it is
    poll(lambda: got.append(pings(s, 0.5)) or sum(got) >= 3,
         "no watchdog pings while every loop runs", timeout=20, every=0)
    with frozen(thread_of(h1, "fanpkt-tx-241")):
        poll(lambda: "loop(s) tx-241 made no progress" in open(lab.logs[h1]).read(),
             "the forwarder never noticed the stuck loop")
        drain(s)
        assert pings(s, 2.0) == 0                        # four intervals without a ping
        assert p.poll() is None
    poll(lambda: pings(s, 0.6), "the pings never resumed", every=0)
    assert "watchdog pings resume" in open(lab.logs[h1]).read()
    assert lab.stop(p) == 0


SLOW_NFT = """#!/bin/sh
# nft that takes 3 s while the flag file exists, as a loaded host's may
[ -e "{flag}" ] && sleep 3
exec /usr/sbin/nft "$@"
"""


def test_watchdog_pings_go_on_through_a_long_reload(lab, notify_socket, tmp_path):
    """A reload may keep the main thread for longer than WatchdogSec (nft up to 30 s,
    dnsmasq 5 s a fan): while every loop still moves, the pings go on, and systemd does
    not restart a forwarder that is only busy."""
    s, path = notify_socket
    fake = tmp_path / "bin"
    fake.mkdir()
    flag = tmp_path / "slow"
    (fake / "nft").write_text(SLOW_NFT.format(flag=flag))
    (fake / "nft").chmod(0o755)
    conf = tmp_path / "fan"
    conf.write_text(f"241.0.0.0/8 {H1}/16\n")
    h1 = lab.host("h1", H1)
    p = lab.forward(h1, "-c", str(conf), env={"NOTIFY_SOCKET": path,
                                              "WATCHDOG_USEC": "1000000",
                                              "PATH": f"{fake}:{os.environ['PATH']}"})
    poll(lambda: pings(s, 0.6), "no watchdog pings", every=0)
    conf.write_text(f"241.0.0.0/8 {H1}/16\n10.0.0.0/8 {H1}/16\n")
    flag.write_text("")
    p.send_signal(signal.SIGHUP)
    poll(lambda: receive(s).get("RELOADING") == "1", "no RELOADING=1", every=0)
    got = pings(s, 2.5)                     # inside the 3 s nft: five intervals
    assert got >= 3, got
    assert p.poll() is None
    flag.unlink()
    out = nsx(h1, *FANPKT, "show").stdout
    poll(lambda: "10.0.0.0/8" in nsx(h1, *FANPKT, "show").stdout, f"no reload: {out}")


def test_a_config_file_that_is_no_regular_file_is_refused_at_once(lab, tmp_path):
    """`fanpkt up -a -c` names the file the forwarder's main thread reads: a FIFO (which
    would block it) and /dev/zero (which would fill its memory) are refused at once, and
    so is a file too large to be a fan file."""
    h1 = lab.host("h1", H1)
    lab.forward(h1, "-o", "241.0.0.0/8", "-u", f"{H1}/16")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big"
    big.write_text("# nothing\n" * 200_000)
    for path, why in ((fifo, "not a regular file"), ("/dev/zero", "not a regular file"),
                      (big, "over 1048576 bytes")):
        t = time.monotonic()
        r = nsx(h1, *FANPKT, "up", "-a", "-c", str(path), check=False, timeout=30)
        assert r.returncode == 2 and why in r.stderr, r.stderr
        assert time.monotonic() - t < 10
    assert ping(h1, "241.1.1.1", count=1).returncode == 0
