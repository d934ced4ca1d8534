"""fanpkt/engine.py: the one door to the compiled core. Its rows are checked whoever
loads them, a table swap waits for every loop, a dying loop is reported, and a missing
core is one line and exit status 8."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading

import pytest

from fanpkt.config import MAX_QUEUES
from fanpkt.engine import (COMM_LEN, Dataplane, LoopThread, MapRow, fastpath,
                           kernel_name)
from fanpkt.errors import LoopError
from fanpkt.fanmap import FanMap

MAP = FanMap.parse("241.0.0.0/8", "172.16.3.4/16")


@pytest.mark.parametrize("change,message", [
    ({"overlay_len": 0}, "bad prefix lengths"),            # shift of 32
    ({"overlay_len": 16}, "bad prefix lengths"),           # u <= o
    ({"mtu": 80}, "bad MTU"),                              # < 68 + 20
    ({"kind": "gre"}, "bad fan type"),
    ({"kind": "vxlan", "vni": 1 << 24, "port": 8472, "dev_mac": b"\x02" * 6}, "bad VXLAN"),
    ({"kind": "vxlan", "vni": 1, "port": 8472, "dev_mac": b""}, "bad VXLAN"),
    ({"ifindex": 3, "mac": b""}, "bad underlay interface"),
])
def test_load_rejects_impossible_rows(change, message):
    row = dataclasses.replace(MapRow.of(MAP), **change)
    eng = fastpath.Engine([MapRow.of(MAP)])
    with pytest.raises(ValueError, match=message):
        eng.load([row])
    assert fastpath.map_dest(eng, 0xF1060708)[1] == 0xAC100607      # old table kept


def test_a_dead_loop_is_reported():
    dp = Dataplane()
    release = threading.Event()

    def crashes(loop):
        release.wait(10)
        raise RuntimeError("boom")
    lt = LoopThread("tx-test", crashes)
    dp.loops[lt.name] = lt
    dp.check()                                      # alive: nothing to say
    release.set()
    lt.thread.join(10)
    with pytest.raises(LoopError, match="tx-test died .RuntimeError: boom.") as e:
        dp.check()
    assert e.value.exit_status == 9
    dp.loops.clear()


def test_a_loop_told_to_stop_is_not_dead():
    dp = Dataplane()
    lt = LoopThread("rx-test", lambda loop: None)   # returns at once
    dp.loops[lt.name] = lt
    lt.thread.join(10)
    with pytest.raises(LoopError, match="it returned"):
        dp.check()
    lt.stopping = True
    dp.check()


def every_loop_name() -> list[str]:
    """The names the engine's data path gives its loops (userpath.py), for devices of every
    shape: one octet, two, three (the longest), the hex fallback."""
    from fanpkt.userpath import tx_loop_names, vxlan_loop
    devices = [FanMap.parse(o, u).device_name
               for o, u in (("241.0.0.0/8", "10.1.2.3/16"), ("100.64.0.0/10", "10.1.2.3/16"),
                            ("100.100.100.0/22", "10.1.2.3/28"),
                            ("100.100.100.128/25", "10.1.2.1/30"))]
    assert len(max(devices, key=len)) == 15 and len({len(d) for d in devices}) == 4
    names = []
    for q in range(MAX_QUEUES):
        suffix = f".{q}" if q else ""
        names += [tx_loop_names(d, q + 1)[q] for d in devices]
        names.append(f"rx{suffix}")
        names += [vxlan_loop(port, q) for port in (1, 8472, 65535)]
    return names


def test_thread_names_are_unique_within_the_kernels_15_characters():
    """Every VXLAN receive loop used to be `fanpkt-rx-vxlan` to the kernel."""
    names = every_loop_name()
    comms = [kernel_name(n) for n in names]
    assert max(map(len, comms)) <= COMM_LEN == 15
    assert len(set(comms)) == len(names)
    assert [kernel_name(n) for n in ("tx-241", "tx-241.1", "rx", "rx.3", "rx-vxlan-8472",
                                     "rx-vxlan-8472.1", "tx-100-100-100.7")] == [
        "fanpkt-tx-241", "fanpkt-tx-241.1", "fanpkt-rx", "fanpkt-rx.3", "fanpkt-rxv-8472",
        "rxv-8472.1", "t100-100-100.7"]


def test_a_loop_thread_carries_its_kernel_name():
    seen = {}

    def body(loop):
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            seen["comm"] = f.read().strip()
    lt = LoopThread("rx-vxlan-8472.1", body)
    lt.thread.join(10)
    assert seen == {"comm": "rxv-8472.1"}


def test_missing_core_is_exit_status_8():
    """As on a broken install: the import of fanpkt._fastpath fails."""
    code = ("import sys; sys.modules['fanpkt._fastpath'] = None; "
            "from fanpkt.cli import forward_main; "
            "sys.exit(forward_main(['-o', '241.0.0.0/8', '-u', '172.16.3.4/16']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 8, r.stderr
    assert "compiled core fanpkt._fastpath is missing" in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def run_loop_until(target, args, until, timeout=10):
    """Run a forwarding loop (run_tx or run_rx) on a thread until until() holds, then stop
    it; fails if the loop raises or does not stop."""
    from lab import poll
    loop = fastpath.Loop()
    errors = []

    def body():
        try:
            target(*args[:1], loop, *args[1:])
        except BaseException as e:  # noqa: BLE001 - reported to the test
            errors.append(e)
    t = threading.Thread(target=body, daemon=True)
    t.start()
    try:
        poll(until, "the loop never got there", timeout)
    finally:
        loop.stop()
        t.join(10)
    assert not t.is_alive() and not errors, errors


def test_a_failing_read_is_counted_not_taken_for_an_empty_device():
    """read() on the device fails with something other than EAGAIN (here EISDIR: a
    directory that poll() calls readable, so an uncounted error would also spin)."""
    import os
    from fanpkt.engine import COUNTER_NAMES, new_counters
    eng = fastpath.Engine([MapRow.of(MAP)])
    c = new_counters()
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        run_loop_until(fastpath.run_tx, (eng, fd, -1, -1, c),
                       lambda: c[COUNTER_NAMES.index("drop_tx_read_error")] >= 3)
    finally:
        os.close(fd)


def test_a_failing_receive_is_counted():
    """An error a peer's ICMP leaves on the socket (here ECONNREFUSED on a UDP socket whose
    datagram met a closed port) fails one recvmmsg(): counted, and the loop goes on."""
    import socket
    from fanpkt.engine import COUNTER_NAMES, new_counters
    eng = fastpath.Engine([MapRow.of(MAP)])
    c = new_counters()
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    s.connect(("127.0.0.1", port))
    s.send(b"x")
    try:
        run_loop_until(fastpath.run_rx, (eng, s.fileno(), c),
                       lambda: c[COUNTER_NAMES.index("drop_rx_recv_error")] == 1)
    finally:
        s.close()


def test_datagrams_the_full_socket_dropped_are_counted():
    """The kernel drops datagrams at a receive socket whose buffer is full; with
    SO_RXQ_OVFL each datagram queued after drops carries the socket's total, which the loop
    keeps in drop_rx_socket_full: every datagram sent is either read or counted there."""
    import socket
    from fanpkt.engine import COUNTER_NAMES, new_counters
    eng = fastpath.Engine([MapRow.of(MAP)])
    c = new_counters()
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    rx.setsockopt(socket.SOL_SOCKET, 40, 1)                 # SO_RXQ_OVFL
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(200):
        tx.sendto(bytes(1000), rx.getsockname())
    rx.setblocking(False)
    queued = 0
    while True:                     # what fitted; the count rides on datagrams queued later
        try:
            rx.recv(2048)
        except BlockingIOError:
            break
        queued += 1
    tx.sendto(bytes(1000), rx.getsockname())
    full = COUNTER_NAMES.index("drop_rx_socket_full")
    try:
        run_loop_until(fastpath.run_rx, (eng, rx.fileno(), c), lambda: c[full] > 0)
        assert 0 < queued < 200 and c[full] == 200 - queued
    finally:
        rx.close()
        tx.close()
