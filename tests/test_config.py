"""/etc/network/fan and fanctl argument forms (docs/spec.md §3), with a fake resolver."""
from __future__ import annotations

import os

import pytest

from fanpkt.config import MAX_CONFIG, make_spec, parse_file, parse_lines
from fanpkt.errors import ConfigError
from fanpkt.fanmap import ip


class FakeResolver:
    def __init__(self):
        self.addrs = {"eth0": "172.16.3.4", "ens5": "10.88.3.4"}

    def interface_address(self, ifname):
        if ifname not in self.addrs:
            raise ConfigError(f"no interface named {ifname!r}")
        from packets import a
        return a(self.addrs[ifname])

    def default_interface(self):
        return "ens5"


R = FakeResolver()


@pytest.mark.parametrize("overlay,underlay,want", [
    ("241.0.0.0/8", "172.16.3.4/16", ("241.0.0.0/8", "172.16.0.0/16", "172.16.3.4")),
    ("241", "172.16.3.4/16", ("241.0.0.0/8", "172.16.0.0/16", "172.16.3.4")),
    ("241.0.0.0/8", "172.16.3.4", ("241.0.0.0/8", "172.16.0.0/16", "172.16.3.4")),
    ("10.0.0.0/8", "eth0", ("10.0.0.0/8", "172.16.0.0/16", "172.16.3.4")),
    ("10.0.0.0/8", "eth0/16", ("10.0.0.0/8", "172.16.0.0/16", "172.16.3.4")),
    ("250", "eth0/20", ("250.0.0.0/8", "172.16.0.0/20", "172.16.3.4")),
    ("99", "default", ("99.0.0.0/8", "10.88.0.0/16", "10.88.3.4")),
    ("99", "default/24", ("99.0.0.0/8", "10.88.3.0/24", "10.88.3.4")),
    ("241.0.0.0/8", "172.16.3.0/16", ("241.0.0.0/8", "172.16.0.0/16", "172.16.3.0")),
])
def test_underlay_forms(overlay, underlay, want):
    m = make_spec(overlay, underlay, [], R).map
    assert (str(m.overlay_net), str(m.underlay_net), ip(m.host)) == want


def test_flags():
    s = make_spec("241", "eth0", ["dhcp", "host-reserve", "5", "bridge", "fanbr0", "nat"], R)
    assert (s.dhcp, s.map.host_reserve, s.bridge, s.nat, s.off) == (True, 5, "fanbr0", True, False)
    assert s.flags == ["dhcp", "host-reserve 5", "bridge fanbr0", "nat"]


@pytest.mark.parametrize("flags,message", [
    (["bogus"], "unknown flag 'bogus'"),
    (["host-reserve"], "needs a value"),
    (["host-reserve", "x"], "'x' is not a number"),
    (["host-reserve", "300"], "between 1 and 253"),
    (["bridge", "a-very-long-bridge-name"], "not a valid interface name"),
    (["type", "gre"], "carries ipip and vxlan"),
    (["type", "vxlan", "vni", "16777216"], "vni 16777216 must be 0..16777215"),
    (["type", "vxlan", "port", "0"], "port 0 must be 1..65535"),
    (["vni", "7"], "flags of 'type vxlan' fans"),
    (["host-reserve", "²"], "'²' is not a number"),
])
def test_flag_errors(flags, message):
    with pytest.raises(ConfigError, match=message):
        make_spec("241", "eth0", flags, R)


def test_a_vxlan_fan_is_auto_by_default_and_an_ipip_fan_always_user():
    """No datapath flag: a VXLAN fan takes the kernel path where it can be set up (auto,
    the default, which its flags do not list); an IPIP fan runs on the userspace engine,
    given the flag or not (a reload sees no change between the two)."""
    vx = make_spec("241", "eth0", ["type", "vxlan"], R)
    assert vx.datapath == "auto" and vx.flags == ["type vxlan"]
    for path in ("user", "kernel"):
        s = make_spec("241", "eth0", ["type", "vxlan", "datapath", path, "dhcp"], R)
        assert s.datapath == path and s.flags == ["type vxlan", f"datapath {path}", "dhcp"]
    assert make_spec("241", "eth0", ["type", "vxlan", "datapath", "auto"], R).key() == vx.key()
    ipip = make_spec("241", "eth0", [], R)
    pinned = make_spec("241", "eth0", ["datapath", "user"], R)
    assert ipip.datapath == pinned.datapath == "user" and ipip.flags == pinned.flags == []
    assert ipip.key() == pinned.key()
    for path in ("auto", "kernel"):
        with pytest.raises(ConfigError, match="an IPIP fan runs on the userspace engine"):
            make_spec("241", "eth0", ["datapath", path], R)
    with pytest.raises(ConfigError, match="datapath 'fast': give one of auto, kernel, user"):
        make_spec("241", "eth0", ["type", "vxlan", "datapath", "fast"], R)


def test_underlay_without_host_is_an_error_for_a_fan():
    with pytest.raises(ConfigError, match="names no host"):
        make_spec("241", "172.16.0.0/16", [], R)


@pytest.mark.parametrize("underlay", ["255.255.255.255/32", "172.16.0.0/32",
                                      "172.16.0.0/31"])
def test_underlay_with_no_host_bits_is_a_config_error(underlay):
    """No address to suggest: a config error all the same, not a traceback (found by
    tests/fuzz.py: the suggestion 255.255.255.255 + 1 raised AddressValueError)."""
    with pytest.raises(ConfigError, match="names no host; give this host's address$"):
        parse_lines([f"172.16.0.0/16 {underlay}"] if underlay.startswith("255") else
                    [f"241.0.0.0/8 {underlay}"], "fan", R)


def test_file(tmp_path):
    f = tmp_path / "fan"
    f.write_text("# fans of this host\n\n241.0.0.0/8 172.16.3.4/16 dhcp   # the classic\n"
                 "10.0.0.0/8 eth0/16 dhcp\n250 default off\n")
    specs = parse_file(str(f), R)
    assert [str(s.map.overlay_net) for s in specs] == ["241.0.0.0/8", "10.0.0.0/8",
                                                       "250.0.0.0/8"]
    assert [s.off for s in specs] == [False, False, True]
    assert specs[1].origin == f"{f}:4"


@pytest.mark.parametrize("text,message", [
    ("241.0.0.0/8\n", ":1: expected '<overlay> <underlay> [flags]'"),
    ("\n241.0.0.0/8 172.16.3.4/16 frobnicate\n", ":2: unknown flag 'frobnicate'"),
    ("241.0.0.0/8 nosuchif\n", ":1: no interface named 'nosuchif'"),
    ("241.0.0.0/8 172.16.3.4/16\n241.128.0.0/9 172.16.3.4/16\n", ":2: overlay 241.128.0.0/9 "
     "overlaps 241.0.0.0/8"),
    ("241.1.0.0/8 172.16.3.4/16\n", ":1: overlay 241.1.0.0/8 is not a network address"),
    ("241.0.0.0/8 172.16.3/16\n", ":1: underlay '172.16.3/16' is neither"),
])
def test_file_errors_name_file_line_token(text, message):
    with pytest.raises(ConfigError) as e:
        parse_lines(text.splitlines(), "/etc/network/fan", R)
    assert str(e.value).startswith("/etc/network/fan:")
    assert message in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="cannot read /nonexistent/fan"):
        parse_file("/nonexistent/fan", R)


def test_only_a_regular_file_of_bounded_size_is_read(tmp_path):
    """The forwarder's main thread reads the file a control request names: a FIFO
    (which would block it), a device (/dev/zero would fill its memory) or a file over
    MAX_CONFIG bytes is a ConfigError at once."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big"
    big.write_bytes(b"#" * (MAX_CONFIG + 1))
    for path, why in ((fifo, "not a regular file"), ("/dev/zero", "not a regular file"),
                      (big, "over")):
        with pytest.raises(ConfigError, match=why):
            parse_file(str(path), None)
    ok = tmp_path / "fan"
    ok.write_text("# nothing but a comment\n")
    assert parse_file(str(ok), None) == []
