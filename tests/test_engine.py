"""fanpkt/engine.py: the one door to the compiled core. Its rows are checked whoever
loads them, a table swap waits for every loop, a dying loop is reported, and a missing
core is one line and exit status 8."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading

import pytest

from fanpkt.engine import Dataplane, LoopThread, MapRow, fastpath
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
