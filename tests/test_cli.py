"""`fanpkt show` and `fanpkt stats`: their text, exactly, and the commands reading a
forwarder's published state (a RunState this test holds). `fanpkt map` is test_cli_map.py."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest

from fanpkt import cli
from fanpkt.config import make_spec
from fanpkt.engine import COUNTER_BLOCK, COUNTER_NAMES
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


def state(fans=FANS, names=COUNTER_NAMES, block=COUNTER_BLOCK) -> State:
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


def test_show_lists_the_data_path_each_vxlan_fan_runs_on():
    """A VXLAN fan's Flags say the path it runs on, whatever was asked: auto (the default,
    not among its flags) on the kernel path or fallen back to the engine, and user.
    An IPIP fan lists no datapath."""
    def vxlan(overlay, datapath, *flags):
        return dataclasses.replace(fan_state(overlay, "172.16.3.4/16", "fan-" + overlay[:3],
                                             "type", "vxlan", *flags),
                                   bridge="fanbr-" + overlay[:3], type="vxlan",
                                   datapath=datapath)
    fans = [vxlan("250.0.0.0/8", "kernel", "dhcp"),
            vxlan("240.0.0.0/8", "user", "port", "4789"),
            vxlan("200.0.0.0/8", "user", "datapath", "user"),
            vxlan("210.0.0.0/8", "kernel", "datapath", "kernel", "nat"),
            FANS[1]]
    assert cli.format_show(state(fans=fans)).splitlines()[1:] == [
        "fanbr-250   172.16.3.4/16  250.0.0.0/8    type vxlan datapath kernel dhcp",
        "fanbr-240   172.16.3.4/16  240.0.0.0/8    type vxlan port 4789 datapath user",
        "fanbr-200   172.16.3.4/16  200.0.0.0/8    type vxlan datapath user",
        "fanbr-210   172.16.3.4/16  210.0.0.0/8    type vxlan datapath kernel nat",
        "fan-100-64  10.1.9.77/20   100.64.0.0/10  -"]


def test_show_no_fans():
    assert cli.format_show(state(fans=[])) == "Bridge  Underlay  Overlay  Flags"


def block(**values) -> dict:
    """One loop's counters, as runstate.totals() lists them: every name, in enum order."""
    return {n: values.get(n, 0) for n in COUNTER_NAMES}


def two_fans(ipip_rx_fans=("fan-241",)) -> dict:
    """A snapshot of the demo's host1: an IPIP fan and a VXLAN fan with two queues."""
    return {
        "pid": 4242,
        "loops": {
            "rx": block(rx_packets=45012, rx_bytes=70_500_123, rx_gro_merged=40000,
                        drop_rx_not_local=2),
            "tx:fan-241": block(tx_packets=48000, tx_bytes=71_000_000, tx_tso_split=1200,
                                tx_l2=47990, drop_tx_no_map=4),
            "tx:fan-250": block(tx_packets=50000, tx_bytes=999_999, tx_l2=50000,
                                tx_gso=2300, drop_tx_no_map=25, drop_tx_to_self=3),
            "tx:fan-250:q1": block(tx_packets=10, tx_bytes=1),
            "rx-vxlan:8472": block(rx_packets=46000, rx_bytes=2_345_678_901,
                                   rx_udp_gro=45000, rx_gro_merged=44000)},
        "loop_fans": {"rx": list(ipip_rx_fans), "tx:fan-241": ["fan-241"],
                      "tx:fan-250": ["fan-250"], "tx:fan-250:q1": ["fan-250"],
                      "rx-vxlan:8472": ["fan-250"]},
        "fans": [{"device": "fan-241", "type": "ipip", "overlay": "241.0.0.0/8",
                  "flags": ["dhcp", "bridge fanbr1"],
                  "offloads": {"gso_tcpv4": True, "gso_udp_l4": True}},
                 {"device": "fan-250", "type": "vxlan", "overlay": "250.0.0.0/8",
                  "flags": ["type vxlan", "dhcp"],
                  "offloads": {"gso_tcpv4": True, "gso_udp_l4": False}}],
        "devices": {"fan-241": {"tx_dropped": 0, "rx_dropped": 0},
                    "fan-250": {"tx_dropped": 7, "rx_dropped": None}}}


STATS = """\
fanpkt-forward pid 4242
fan fan-241: 241.0.0.0/8 ipip, dhcp, bridge fanbr1
  tx          48,000 packets    71.0 MB  4 dropped
      drops: no_map 4
      paths: tso_split 1,200, l2 47,990
  rx          45,012 packets    70.5 MB  2 dropped
      drops: not_local 2
      paths: gro_merged 40,000
fan fan-250: 250.0.0.0/8 vxlan, dhcp; without gso_udp_l4
  tx          50,010 packets     1.0 MB  28 dropped
      drops: no_map 25, to_self 3
      paths: l2 50,000, gso 2,300
  rx          46,000 packets     2.3 GB  0 dropped
      paths: gro_merged 44,000, udp_gro 45,000
  kernel at fan-250: tx_dropped 7"""


def test_stats_exact():
    """Per fan and direction: packets, bytes in SI units, all drops; then only the drop
    reasons and paths that are not zero, in the enum's order, named without the
    direction; a queue's loop adds to its
    fan; the kernel's drops at a device only when there are some."""
    assert cli.format_stats(two_fans()) == STATS


def test_stats_of_a_busy_host1_fit_one_screen():
    """The demo's host1 after its transfers, every path a busy host takes counting in the
    millions and the usual drops: within 24 lines of 80 columns."""
    snap = two_fans()
    busy = {"tx": dict(tx_packets=9, tx_bytes=9, tx_tso_split=9, tx_l2=9, tx_gso=9,
                       tx_gso_joined=9, tx_fragmented=9, drop_tx_no_map=9,
                       drop_tx_to_self=9, drop_tx_ethertype=9),
            "rx": dict(rx_packets=9, rx_bytes=9, rx_gro_merged=9, rx_kernel_gro=9,
                       rx_udp_gro=9, rx_ecn_ce=9, drop_rx_not_local=9,
                       drop_rx_socket_full=9)}
    snap["loops"] = {loop: block(**{n: 123_456_789 for n in busy[loop[:2]]})
                     for loop in snap["loops"]}
    snap["devices"] = {d: {"tx_dropped": 5, "rx_dropped": 6} for d in snap["devices"]}
    lines = cli.format_stats(snap).splitlines()
    assert len(lines) <= 24 and max(map(len, lines)) <= 80, "\n".join(lines)


def test_stats_lines_stay_within_80_columns():
    """Every counter past a trillion: the lists wrap, and nothing is left out."""
    snap = two_fans()
    snap["loops"] = {loop: {n: 10**12 + k for k, n in enumerate(COUNTER_NAMES)}
                     for loop in snap["loops"]}
    text = cli.format_stats(snap)
    assert max(map(len, text.splitlines())) <= 80
    for n in COUNTER_NAMES:
        if not n.endswith(("_packets", "_bytes")):
            assert f" {n.split('_', 2 if n.startswith('drop_') else 1)[-1]} 1" in text, n


def test_stats_of_a_shared_receive_loop_say_so():
    """The IPIP receive loop serves every IPIP fan and cannot tell them apart: its counts
    show once, under the first of its fans, and the others point there."""
    snap = two_fans(ipip_rx_fans=("fan-10", "fan-241"))
    snap["fans"].insert(0, {"device": "fan-10", "type": "ipip", "overlay": "10.0.0.0/8",
                            "flags": []})
    snap["loops"]["tx:fan-10"], snap["loop_fans"]["tx:fan-10"] = block(), ["fan-10"]
    lines = cli.format_stats(snap).splitlines()
    assert lines[1:7] == [
        "fan fan-10: 10.0.0.0/8 ipip",
        "  tx               0 packets        0 B  0 dropped",
        "  rx          45,012 packets    70.5 MB  2 dropped",
        "      one receive loop for fan-10, fan-241: their packets together",
        "      drops: not_local 2",
        "      paths: gro_merged 40,000"]
    fan241 = lines.index("fan fan-241: 241.0.0.0/8 ipip, dhcp, bridge fanbr1")
    assert lines[fan241 + 4] == ("  rx  counted with fan-10 (one receive loop for fan-10, "
                                 "fan-241)")


def test_stats_say_which_offloads_a_fan_runs_without_and_all_with():
    """The kernel's answers to the offload probe (docs/kernels.md): the person's view
    names only what a fan's kernel lacks, --all what it took."""
    snap = two_fans()
    lines = cli.format_stats(snap).splitlines()
    assert "fan fan-241: 241.0.0.0/8 ipip, dhcp, bridge fanbr1" in lines
    assert "fan fan-250: 250.0.0.0/8 vxlan, dhcp; without gso_udp_l4" in lines
    lines = cli.format_stats_all({**snap, "total": {}}).splitlines()
    assert ("fan fan-241: 241.0.0.0/8 ipip, dhcp, bridge fanbr1; offloads gso_tcpv4 "
            "gso_udp_l4") in lines
    assert "fan fan-250: 250.0.0.0/8 vxlan, dhcp; offloads gso_tcpv4" in lines


def test_stats_all_exact():
    """--all: every counter summed over the fans, by direction, as the full dump."""
    snap = {"pid": 4242, "loops": {},
            "total": {"rx_packets": 7, "tx_packets": 10, "drop_rx_truncated": 1,
                      "drop_tx_no_map": 2, "tx_bytes": 1500}}
    assert cli.format_stats_all(snap) == (
        "fanpkt-forward pid 4242\n"
        "tx:\n"
        "  tx_packets                   10\n"
        "  drop_tx_no_map               2\n"
        "  tx_bytes                     1500\n"
        "rx:\n"
        "  rx_packets                   7\n"
        "  drop_rx_truncated            1")


def test_stats_all_lists_every_counter_once_under_its_direction():
    snap = {"pid": 1, "loops": {}, "total": {n: k for k, n in enumerate(COUNTER_NAMES)}}
    lines = cli.format_stats_all(snap).splitlines()
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
    c = rs.create_counters(N_BLOCKS, COUNTER_BLOCK)
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
    # fan-241 and fan-100-64 are both IPIP: one receive loop counts them together
    assert out[1:] == [
        "fan fan-241: 241.0.0.0/8 ipip, dhcp, bridge fanbr0, nat",
        "  tx               4 packets        0 B  0 dropped",
        "  rx               7 packets        0 B  0 dropped",
        "      one receive loop for fan-100-64, fan-241: their packets together",
        "fan fan-100-64: 100.64.0.0/10 ipip",
        "  tx               5 packets        0 B  0 dropped",
        "  rx  counted with fan-241 (one receive loop for fan-100-64, fan-241)"]
    assert cli.main(["stats", "--all", "--run-dir", running.path]) == 0
    out = capsys.readouterr().out.splitlines()
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


# -- the command on a real forwarder ----------------------------------------------------
def test_stats_of_two_real_fans(lab, tmp_path):
    """Two hosts, each with an IPIP and a VXLAN fan, as the demo's: after pings across
    both, `fanpkt stats` on h1 shows each fan's own packets both ways, fits a screen, and
    `--all` is the full dump."""
    from lab import FANPKT, nsx, poll
    hosts = {}
    for name, addr in (("h1", "172.16.1.1"), ("h2", "172.16.2.1")):
        ns = hosts[name] = lab.host(name, addr)
        conf = tmp_path / f"fan-{name}"
        conf.write_text(f"241.0.0.0/8 {addr}/16\n250.0.0.0/8 {addr}/16 type vxlan\n")
        lab.forward(ns, "-c", str(conf))
    h1 = hosts["h1"]
    for dst, count in (("241.2.1.1", 3), ("250.2.1.1", 5)):
        poll(lambda: nsx(h1, "ping", "-n", "-c", str(count), "-i", "0.05", "-W", "1", dst,
                         check=False).returncode == 0, f"no ping to {dst}", timeout=20)

    def stats():
        return nsx(h1, *FANPKT, "stats").stdout.splitlines()
    lines = stats()
    assert len(lines) <= 24 and max(map(len, lines)) <= 80, "\n".join(lines)
    assert lines[0].startswith("fanpkt-forward pid ")
    fan241 = lines.index("fan fan-241: 241.0.0.0/8 ipip")
    fan250 = lines.index("fan fan-250: 250.0.0.0/8 vxlan, kernel path")     # the default

    def packets(first, last, d):
        row = next(r for r in lines[first:last] if r.startswith(f"  {d} "))
        return int(row.split()[1].replace(",", ""))
    # each fan counts its own traffic (at least the pings and their replies; ARP too)
    assert packets(fan241, fan250, "tx") >= 3 and packets(fan241, fan250, "rx") >= 3
    assert packets(fan250, len(lines), "tx") >= 5 and packets(fan250, len(lines), "rx") >= 5
    every = nsx(h1, *FANPKT, "stats", "--all").stdout.splitlines()
    assert "tx:" in every and "rx:" in every
    assert sum(line.startswith("  ") for line in every) >= len(COUNTER_NAMES)
