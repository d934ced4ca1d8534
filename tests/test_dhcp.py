"""The dhcp flag's dnsmasq (fanpkt/dhcp.py): the pool, the command line, and a dnsmasq that
fails to come up. Serving a real DHCPDISCOVER is in test_forward_netns.py."""
from __future__ import annotations

import os
import sys

import pytest

from fanpkt import dhcp
from fanpkt.config import make_spec

from conftest import NoResolver
from fanpkt.dhcp import command, pool
from fanpkt.errors import FanError
from fanpkt.fanmap import ip


def spec(overlay, underlay, *flags):
    return make_spec(overlay, underlay, ["bridge", "fanbr0", "dhcp", *flags], NoResolver())


def test_pool_is_the_slice_above_the_host_reserve():
    assert [ip(a) for a in pool(spec("241.0.0.0/8", "172.16.3.4/16"))] == \
        ["241.3.4.2", "241.3.4.254"]
    assert [ip(a) for a in pool(spec("241.0.0.0/8", "172.16.3.4/16", "host-reserve", "9"))] \
        == ["241.3.4.10", "241.3.4.254"]
    # 100.64.0.0/10 over /20: slices are /22, the last usable address before broadcast
    assert [ip(a) for a in pool(spec("100.64.0.0/10", "172.16.3.4/20"))] == \
        ["100.76.16.2", "100.76.19.254"]


def test_command_serves_only_the_bridge_without_dns():
    cmd = command(spec("241.0.0.0/8", "172.16.3.4/16"), 1480, "/run/x")
    assert cmd[0] == "dnsmasq" and "--port=0" in cmd and "--conf-file=/dev/null" in cmd
    assert "--interface=fanbr0" in cmd and "--bind-dynamic" in cmd
    assert "--dhcp-range=241.3.4.2,241.3.4.254,255.255.255.0,12h" in cmd
    assert "--dhcp-option=option:router,241.3.4.1" in cmd
    assert "--dhcp-option-force=option:mtu,1480" in cmd     # also to clients not asking
    assert cmd[-1] == "--pid-file=/run/x/dhcp-fanbr0.pid"


def test_a_dnsmasq_that_exits_at_once_is_one_clear_error(monkeypatch, tmp_path):
    real = dhcp.command
    monkeypatch.setattr(dhcp, "command", lambda *a: [real(*a)[0], "--no-such-option",
                                                     *real(*a)[1:]])
    with pytest.raises(FanError, match="dnsmasq for bridge fanbr0 exited with status"):
        dhcp.start(spec("241.0.0.0/8", "172.16.3.4/16"), 1480, str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_a_dnsmasq_that_never_serves_is_ended_and_an_error(monkeypatch, tmp_path):
    """No pid file, so its DHCP socket was never bound: the fan must not be reported up."""
    files = command(spec("241.0.0.0/8", "172.16.3.4/16"), 1480, str(tmp_path))[-2:]
    monkeypatch.setattr(dhcp, "command", lambda *a: [
        sys.executable, "-c", "import time; time.sleep(60)", *files])
    monkeypatch.setattr(dhcp, "READY_TIMEOUT", 0.5)
    with pytest.raises(FanError, match="was not serving after"):
        dhcp.start(spec("241.0.0.0/8", "172.16.3.4/16"), 1480, str(tmp_path))
    assert [p for p in os.listdir("/proc") if files[-1].encode() in cmdline(p)] == []


def cmdline(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:         # not a process, or one that has just ended
        return b""
