"""Real LXC containers on fanpkt fans (tests/containers.py): two fan hosts, each with a
busybox container on its fan bridge that takes its address, router and MTU by DHCP from
the fan's dnsmasq (`bridge fanbr dhcp`), then TCP both ways across the fan. IPIP and
VXLAN; the containers, their monitors and LXC's files are gone after each test."""
from __future__ import annotations

import os

import pytest

from containers import LOCK_ROOT, Lxc
from lab import nsx

FANS = [("ipip", 1480, 24), ("vxlan", 1450, 8)]       # type, overlay MTU, on-link prefix


@pytest.fixture
def lxc(lab, tmp_path):
    """An lxcpath of the test's own; closed before the lab's namespaces go."""
    containers = Lxc(str(tmp_path / "lxc"))
    try:
        yield containers
    finally:
        containers.close()


def fan_hosts(lab, fan_type):
    hosts = []
    for i in (1, 2):
        addr = f"172.16.{i}.1"
        ns = lab.host(f"h{i}", addr)
        lab.forward(ns, "-o", "241.0.0.0/8", "-u", f"{addr}/16", "--type", fan_type,
                    "bridge", "fanbr", "dhcp")
        hosts.append(ns)
    return hosts


def dnsmasq_leases(ns) -> str:
    ino = os.stat(f"/run/netns/{ns}").st_ino
    with open(f"/run/fanpkt/net-{ino}/dhcp-fanbr.leases") as f:
        return f.read()


@pytest.mark.parametrize("fan_type, mtu, plen", FANS, ids=[f[0] for f in FANS])
def test_lxc_containers_get_dhcp_and_talk_tcp(lab, lxc, fan_type, mtu, plen):
    h1, h2 = fan_hosts(lab, fan_type)
    c1, c2 = f"{lab.prefix}c1", f"{lab.prefix}c2"       # LXC names, as namespaces have
    for ns, name in ((h1, c1), (h2, c2)):
        lxc.start(ns, name, "fanbr")
    leases = {}
    for i, (ns, name) in enumerate(((h1, c1), (h2, c2)), 1):
        got = leases[name] = lxc.lease(name)
        gw = f"241.{i}.1.1"
        # an address of the host's slice, the gateway as router, the fan's on-link prefix
        # and MTU, all from the fan's own dnsmasq ...
        assert (got["router"], got["plen"], got["mtu"]) == (gw, plen, mtu), got
        assert got["addr"].startswith(f"241.{i}.1.")
        assert 2 <= int(got["addr"].rsplit(".", 1)[1]) <= 254
        assert f" {got['mac']} {got['addr']} " in dnsmasq_leases(ns)
        # ... and the MTU by DHCP, not from LXC: the link started at 1500, as its host
        # end still is
        veth = lxc.host_veth(name)
        assert nsx(ns, "cat", f"/sys/class/net/{veth}/mtu").stdout.strip() == "1500"
        assert " master fanbr " in nsx(ns, "ip", "-o", "link", "show", veth).stdout
    a1, a2 = leases[c1]["addr"], leases[c2]["addr"]
    for src, dst in ((c1, a2), (c2, a1)):
        r = lxc.run(src, "ping", "-c", "3", "-i", "0.2", "-W", "2", dst, check=False)
        assert " 0% packet loss" in r.stdout, r.stdout + r.stderr
    # TCP both ways, full-sized segments at the fan's MTU, checked end to end
    for server, client, addr in ((c2, c1, a2), (c1, c2, a1)):
        digest = lxc.serve(server, 8 << 20)
        assert lxc.fetch(client, addr) == (8 << 20, digest)


def test_close_leaves_no_container_process_veth_or_file(lab, tmp_path):
    ns = lab.host("h1", "172.16.1.1")
    nsx(ns, "ip", "link", "add", "fanbr", "type", "bridge")
    nsx(ns, "ip", "link", "set", "fanbr", "up")
    lxc, c1 = Lxc(str(tmp_path / "lxc")), f"{lab.prefix}c1"
    try:
        lxc.start(ns, c1, "fanbr")
        veth, init, monitor = lxc.host_veth(c1), lxc.inits[c1], lxc.monitors[c1]
        assert os.path.exists(f"/proc/{init}")
        lock = LOCK_ROOT + lxc.path
        assert os.path.isdir(lock)
    finally:
        lxc.close()
    assert monitor.returncode is not None
    assert not os.path.exists(f"/proc/{init}")
    assert veth not in nsx(ns, "ip", "-o", "link").stdout
    assert not os.path.exists(lxc.path) and not os.path.exists(lock)
