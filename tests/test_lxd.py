"""Real LXD (Debian 12's `lxd`, 5.0.2) on fanpkt VXLAN fans, the recipe of docs/lxd.md:
on each host an LXD-managed bridge holding the slice gateway, whose dnsmasq gives the
containers their addresses, and fanpkt joining that bridge with `bridge lxdfan0`. One LXD
daemon per fan host, each in the host's network namespace (tests/lxd.py says why that
works); a busybox image built here and imported, no network access. Containers on two
fanpkt hosts, and one fanpkt host's containers with the Ubuntu fan kernel (ufan-peer).

The daemons, their containers, images, networks, storage pools and state directories are
removed after each test, also when it fails (the `lxds` fixture). LXD must be installed
(tools/setup.sh does it): without it these tests fail, they do not skip."""
from __future__ import annotations

import os
import subprocess
import tempfile

import pytest

from lab import fan_port, link_names, nsx, poll
from lxd import Lxd, build_image, fan_network
from test_ufan_peer import GUEST_CT, fanpkt_on_peer_host, guest_ping, peer  # noqa: F401

OVERLAY = "240.0.0.0/8"                 # LXD's default fan overlay
NET = "lxdfan0"


@pytest.fixture
def lxds(lab):
    """Starts LXD daemons in lab hosts' namespaces; closes every one before the lab's
    namespaces go, and fails the test if LXD refused to delete anything."""
    made = []

    def start(ns):
        made.append(Lxd(ns, tempfile.mkdtemp(prefix=f"{ns}lxd-")))
        return made[-1]
    try:
        yield start
    finally:
        problems = [p for d in made for p in d.close()]
        assert not problems, problems


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return build_image(str(tmp_path_factory.mktemp("lxd-image")))


def lxd_fan_host(lab, lxds, image, name, underlay, slice_prefix, overlay=OVERLAY):
    """A fan host as docs/lxd.md sets it up: LXD's bridge first, then fanpkt joining it."""
    ns = lab.host(name, underlay)
    lxd = lxds(ns)
    lxd.import_image(*image)
    lxd.create_network(NET, fan_network(slice_prefix))
    fwd = lab.forward(ns, "-o", overlay, "-u", f"{underlay}/16", "--type", "vxlan",
                      "bridge", NET)
    return ns, lxd, fwd


def container_on_fan(lab, lxd, name, slice_prefix):
    """Launch a container on the fan bridge; its address, from LXD's DHCP, checked."""
    c = f"{lab.prefix}{name}"
    lxd.launch(c, NET)
    addr = lxd.address(c)
    assert addr.startswith(slice_prefix + ".") and addr != slice_prefix + ".1", addr
    # the fan's MTU reached the container (LXD's veth at the bridge's MTU, and DHCP)
    assert lxd.exec(c, "cat", "/sys/class/net/eth0/mtu").stdout.strip() == "1450"
    return c, addr


def to_log(capsys, text):
    """Into the CI log even when the test passes (pytest shows captured output only for
    failures): `lxc list` with the fan addresses, the transfers' hashes."""
    with capsys.disabled():
        print(f"\n{text}", flush=True)


def lxc_ping(lxd, c, dst):
    r = lxd.exec(c, "ping", "-c", "3", "-i", "0.2", "-W", "2", dst, check=False)
    return " 0% packet loss" in r.stdout, r.stdout + r.stderr


def test_lxd_containers_on_two_fanpkt_hosts(lab, lxds, image, capsys):
    h1, lxd1, fwd1 = lxd_fan_host(lab, lxds, image, "h1", "172.16.3.4", "240.3.4")
    h2, lxd2, _ = lxd_fan_host(lab, lxds, image, "h2", "172.16.5.6", "240.5.6")
    # fanpkt joined LXD's bridge as it is: LXD's gateway address, fanpkt's TAP a port
    for ns, gw in ((h1, "240.3.4.1/8"), (h2, "240.5.6.1/8")):
        assert nsx(ns, "ip", "-4", "-o", "addr", "show", "dev", NET).stdout.count(" inet ") == 1
        assert gw in nsx(ns, "ip", "-4", "-o", "addr", "show", "dev", NET).stdout
        assert fan_port(ns, NET, "fan-240")
    # each host's bridge has a MAC of its own (docs/lxd.md), LXD's doing
    macs = [nsx(ns, "cat", f"/sys/class/net/{NET}/address").stdout for ns in (h1, h2)]
    assert macs[0] != macs[1], macs
    c1, a1 = container_on_fan(lab, lxd1, "c1", "240.3.4")
    c2, a2 = container_on_fan(lab, lxd2, "c2", "240.5.6")
    for ns, lxd, addr in ((h1, lxd1, a1), (h2, lxd2, a2)):
        listing = lxd.list()
        to_log(capsys, f"lxc list on {ns}:\n{listing}")
        assert f"{addr} (eth0)" in listing, listing
    # across the fan both ways, then the host-to-container path through LXD's gateway
    for lxd, c, dst in ((lxd1, c1, a2), (lxd2, c2, a1), (lxd1, c1, "240.5.6.1")):
        ok, out = lxc_ping(lxd, c, dst)
        assert ok, out
    # a file each way, SHA-256 checked end to end
    for (srv_lxd, srv, srv_addr), (cli_lxd, cli) in (((lxd2, c2, a2), (lxd1, c1)),
                                                     ((lxd1, c1, a1), (lxd2, c2))):
        digest = srv_lxd.serve(srv, 4 << 20)
        got = cli_lxd.fetch(cli, f"http://{srv_addr}/blob")
        to_log(capsys, f"{cli} fetched {got[0]} bytes from {srv} ({srv_addr}): "
               f"sha256 {got[1]}, served {digest}")
        assert got == (4 << 20, digest)
    s1, s2 = lab.stats(h1), lab.stats(h2)
    assert s1["tx_packets"] > 2000 and s2["rx_packets"] > 2000, (s1, s2)
    assert s1["drop_rx_spoofed_src"] == s2["drop_rx_spoofed_src"] == 0
    # fanpkt stops: LXD's bridge keeps its gateway and route, the container its host
    gw_before = nsx(h1, "ip", "-4", "-o", "addr", "show", "dev", NET).stdout
    route_before = nsx(h1, "ip", "-4", "route", "show", "dev", NET).stdout
    assert lab.stop(fwd1) == 0
    assert nsx(h1, "ip", "-4", "-o", "addr", "show", "dev", NET).stdout == gw_before
    assert nsx(h1, "ip", "-4", "route", "show", "dev", NET).stdout == route_before
    assert not {"fan-240", "fanvx-8472"} & link_names(h1)
    ok, out = lxc_ping(lxd1, c1, "240.3.4.1")
    assert ok, out
    # and closing LXD leaves nothing of it: no daemon, no process under it, no state
    for lxd in (lxd1, lxd2):
        assert processes_of(lxd.lxd_dir)          # the daemon, its dnsmasq, monitors
        assert lxd.close() == []
        assert lxd.daemon.returncode == 0
        assert not os.path.exists(lxd.dir)
        assert not os.path.exists(f"/run/lxc/lock{lxd.lxd_dir}")
        assert processes_of(lxd.lxd_dir) == []
        assert NET not in nsx(lxd.ns, "ip", "-o", "link").stdout


def processes_of(lxd_dir: str) -> list[str]:
    """Processes that name a daemon's LXD_DIR in their command line or environment: the
    daemon, its dnsmasq, its containers' monitors."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for part in ("cmdline", "environ"):
            try:
                with open(f"/proc/{pid}/{part}", "rb") as f:
                    if lxd_dir.encode() in f.read():
                        found.append(pid)
                        break
            except OSError:
                pass
    return found


def test_lxd_fan_mode_needs_the_ubuntu_kernel(lab, lxds):
    """What LXD's own fan does on this kernel (docs/lxd.md quotes it): the fan-map
    attribute does not exist, so there is no fan bridge for fanpkt to join."""
    ns = lab.host("h1", "10.0.3.4")
    r = lxds(ns).lxc("network", "create", NET, "bridge.mode=fan",
                     "fan.underlay_subnet=10.0.0.0/16", check=False)
    assert r.returncode != 0
    assert ("Failed to run: ip link add lxdfan0-fan type vxlan id 15728640 dev eth0 local "
            "10.0.3.4 dstport 0 fan-map 240.0.0.0/8:10.0.0.0/16: exit status 1 (vxlan: "
            'unknown command "fan-map"?') in r.stderr, r.stderr


def test_lxd_containers_and_the_ubuntu_fan_kernel(lab, peer, lxds, image,  # noqa: F811
                                                  capsys):
    """A mixed fan: an LXD container on a fanpkt host (172.16.3.4, slice 241.3.4.0/24)
    and the container of a real Ubuntu fan host (241.9.9.2, LXD-style VXLAN fan in the
    Ubuntu kernel): a ping and a file each way."""
    p = peer("vxlan")
    lxd = lxds(p.ns)
    lxd.import_image(*image)
    lxd.create_network(NET, fan_network("241.3.4"))
    fanpkt_on_peer_host(lab, p, "--type", "vxlan", "bridge", NET)
    c, addr = container_on_fan(lab, lxd, "c1", "241.3.4")
    listing = lxd.list()
    to_log(capsys, f"lxc list on {p.ns}:\n{listing}")
    assert f"{addr} (eth0)" in listing
    ok, out = lxc_ping(lxd, c, GUEST_CT)
    assert ok, out
    assert guest_ping(p, addr, ct=True)
    # LXD container -> the guest's container
    digest = lxd.serve(c, 2 << 20)
    r = p.run(f"ct wget -q -O /tmp/g http://{addr}/blob; sha256sum /tmp/g", timeout=120)
    assert r.stdout.split()[:1] == [digest], r.stdout + r.stderr
    # the guest's container -> LXD container
    r = p.run("mkdir -p /tmp/www; dd if=/dev/urandom of=/tmp/www/blob bs=1024 count=2048 "
              "2>/dev/null; sha256sum /tmp/www/blob; ct httpd -p 8080 -h /tmp/www")
    served = r.stdout.split()[0]
    poll(lambda: ":8080" in p.run("ct netstat -ltn").stdout, "the guest's httpd never listened")
    assert lxd.fetch(c, f"http://{GUEST_CT}:8080/blob") == (2 << 20, served)


def test_lxd_is_installed_where_tests_run():
    """CI installs LXD (tools/setup.sh): the tests above must run there, never skip."""
    r = subprocess.run(["lxd", "--version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
