"""`fanpkt show` and `fanpkt stats`: their text, exactly, and the commands reading a
forwarder's published state (a RunState this test holds). `fanpkt map` is test_cli_map.py."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest

from fanpkt import cli
from fanpkt.config import make_spec
from fanpkt.engine import COUNTER_NAMES
from fanpkt.runstate import (N_BLOCKS, RX_BLOCK, FanState, RunState, State, process_start,
                             tx_block)


class Resolver:
    def interface_address(self, name):
        raise AssertionError(name)

    def default_interface(self):
        raise AssertionError


def fan_state(overlay, underlay, device, *flags) -> FanState:
    """What the forwarder publishes for a fan brought up from these flags."""
    s = make_spec(overlay, underlay, list(flags), Resolver())
    m = s.map
    return FanState(device=device, bridge=s.bridge, overlay=str(m.overlay_net),
                    underlay=underlay, slice=m.slice_info(m.host)["slice"], flags=s.flags,
                    mtu=1480, plumbing={"gateway": "x"})


FANS = [fan_state("241.0.0.0/8", "172.16.3.4/16", "fan-241", "dhcp", "bridge", "fanbr0", "nat"),
        fan_state("100.64.0.0/10", "10.1.9.77/20", "fan-100-64")]


def state(fans=FANS, names=COUNTER_NAMES, block=32) -> State:
    return State(pid=4242, config=None, check_spoof=True, ip_forward_before="0",
                 counter_names=list(names), counter_block=block,
                 counter_blocks={"rx": RX_BLOCK, "tx:fan-241": tx_block(0),
                                 "tx:fan-100-64": tx_block(1)}, fans=list(fans))


SHOW = ("Bridge      Underlay       Overlay        Flags\n"
        "fanbr0      172.16.3.4/16  241.0.0.0/8    dhcp bridge fanbr0 nat\n"
        "fan-100-64  10.1.9.77/20   100.64.0.0/10  -")


def test_show_exact():
    """A fan on a bridge shows the bridge and its flags; one without shows its device and
    '-'. Columns two spaces apart, as wide as their widest cell, no trailing blanks."""
    assert cli.format_show(state()) == SHOW


def test_show_columns_line_up():
    lines = cli.format_show(state()).splitlines()
    starts = [lines[0].index(h) for h in ("Underlay", "Overlay", "Flags")]
    assert starts == [12, 27, 42]
    for line in lines[1:]:
        assert all(line[s - 2:s] == "  " and line[s] != " " for s in starts)
        assert line == line.rstrip()
    # a wider cell moves the columns after it
    wide = fan_state("10.0.0.0/8", "172.20.1.2/12", "fan-10", "bridge", "fanbridge-long")
    lines = cli.format_show(state(fans=[*FANS, wide])).splitlines()
    assert [lines[0].index(h) for h in ("Underlay", "Overlay", "Flags")] == [16, 31, 46]
    assert lines[3] == "fanbridge-long  172.20.1.2/12  10.0.0.0/8     bridge fanbridge-long"


def test_show_no_fans():
    assert cli.format_show(state(fans=[])) == "Bridge  Underlay  Overlay  Flags"


def test_stats_exact():
    snap = {"pid": 4242, "loops": {},
            "total": {"rx_packets": 7, "tx_packets": 10, "drop_rx_truncated": 1,
                      "drop_tx_no_map": 2, "tx_bytes": 1500}}
    assert cli.format_stats(snap) == (
        "fanpkt-forward pid 4242\n"
        "tx:\n"
        "  tx_packets                   10\n"
        "  drop_tx_no_map               2\n"
        "  tx_bytes                     1500\n"
        "rx:\n"
        "  rx_packets                   7\n"
        "  drop_rx_truncated            1")


def test_stats_lists_every_counter_once_under_its_direction():
    snap = {"pid": 1, "loops": {}, "total": {n: k for k, n in enumerate(COUNTER_NAMES)}}
    lines = cli.format_stats(snap).splitlines()
    assert lines[:2] == ["fanpkt-forward pid 1", "tx:"]
    rx = lines.index("rx:")
    listed = {"tx": lines[2:rx], "rx": lines[rx + 1:]}
    for direction, rows in listed.items():
        names = [r.split()[0] for r in rows]
        assert names == [n for n in COUNTER_NAMES
                         if n.startswith((f"{direction}_", f"drop_{direction}_"))]
        for r in rows:                      # values in one column, after a 28-wide name
            assert r[:2] == "  " and r[30] == " " and r[31] != " "
            assert int(r[31:]) == snap["total"][r.split()[0]]
    assert sum(len(rows) for rows in listed.values()) == len(COUNTER_NAMES)


# -- the commands, against a forwarder's published state ------------------------------------
@pytest.fixture
def running(tmp_path):
    """A forwarder's side: lock held, state.json and counters published."""
    rs = RunState(str(tmp_path / "run"))
    rs.acquire()
    c = rs.create_counters(N_BLOCKS, 32)
    # as published by a live process (this one): readers check the pid and start time
    rs.write_state(dataclasses.replace(state(), pid=os.getpid(),
                                       started=process_start(os.getpid())))
    c.block(RX_BLOCK)[COUNTER_NAMES.index("rx_packets")] = 7
    c.block(tx_block(0))[COUNTER_NAMES.index("tx_packets")] = 4
    c.block(tx_block(1))[COUNTER_NAMES.index("tx_packets")] = 5
    yield rs
    rs.release()


def test_show_and_stats_commands(running, capsys):
    assert cli.main(["show", "--run-dir", running.path]) == 0
    assert capsys.readouterr() == (SHOW + "\n", "")
    assert cli.main(["stats", "--run-dir", running.path]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"fanpkt-forward pid {os.getpid()}"
    assert "  tx_packets                   9" in out and "  rx_packets                   7" in out
    assert cli.main(["stats", "--json", "--run-dir", running.path]) == 0
    snap = json.loads(capsys.readouterr().out)
    assert snap["total"]["tx_packets"] == 9 and snap["loops"]["tx:fan-100-64"]["tx_packets"] == 5


@pytest.mark.parametrize("command", ["show", "stats"])
def test_nothing_running_is_exit_status_6(tmp_path, capsys, command):
    assert cli.main([command, "--run-dir", os.fspath(tmp_path)]) == 6
    assert capsys.readouterr() == (
        "", "fanpkt: no fanpkt-forward is running in this network namespace\n")


@pytest.mark.parametrize("argv", [
    ["show", "--run-dir", "\ud800"], ["stats", "--run-dir", "a\0b"],
    ["up", "-a", "-c", "\udfff"], ["down", "-e", "--run-dir", ""]])
def test_a_name_no_file_can_have_is_a_usage_error(capsys, argv):
    """A lone surrogate or a NUL cannot reach open(): exit 2 and one line, no traceback."""
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("fanpkt: ") and "not a valid file name" in err
    assert err.count("\n") == 1


def test_forward_refuses_a_config_name_no_file_can_have(capsys):
    assert cli.forward_main(["-c", "\ud800"]) == 2
    assert "not a valid file name" in capsys.readouterr().err
