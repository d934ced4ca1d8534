"""What fanpkt asks of the kernel, checked on the kernel that runs the tests: the offload
probe's verdict (fanpkt/tun.py), and for both fan types two hosts that ping, carry a TCP
transfer with a matching hash, and deliver a burst of one flow's UDP datagrams whole and
in order - with UDP merging as the probe found it, forced off, and forced on (a kernel
that then refuses the superpacket at run time gets the datagrams one by one).

tools/test.sh runs this file on this machine's kernel with the rest of the suite, and
again on older kernels booted in qemu (tools/kernel_vm.py): the kernel matrix."""
from __future__ import annotations

import json
import os
import re

import pytest

from lab import FANPKT, TRAFFIC, nsx, ping, poll, start, tcp_transfer

UDP_L4_SINCE = (6, 2)           # VIRTIO_NET_HDR_GSO_UDP_L4 in TUN/TAP writes
FANS = {"ipip": ["-o", "241.0.0.0/8"],
        # the userspace engine's TAP, and its offloads on each kernel
        "vxlan": ["-o", "241.0.0.0/8", "--type", "vxlan", "--datapath", "user"],
        # the kernel's own vxlan driver steered by fanpkt's eBPF programs (kernelpath.py)
        "vxlan-kernel-path": ["-o", "241.0.0.0/8", "--type", "vxlan", "--datapath", "kernel"]}

PROBE = """
import json, sys
from fanpkt.tun import Tun
t = Tun("fpprobe0", 1400, tap=sys.argv[1] == "tap")
print(json.dumps({"gso": t.gso, "dev_gso": t.dev_gso}))
t.close()
"""


def kernel() -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", os.uname().release).groups()
    return int(major), int(minor)


def probe(ns, kind, forced=""):
    r = nsx(ns, "env", f"FANPKT_OFFLOADS={forced}", "python3", "-c", PROBE, kind, check=False)
    return r


@pytest.mark.parametrize("kind", ["tun", "tap"])
def test_the_probe_answers_as_this_kernel_does(lab, kind):
    ns = lab.host("h1", "172.16.1.1")
    r = probe(ns, kind)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    want = {"tcpv4": True, "udp_l4": kernel() >= UDP_L4_SINCE}
    assert got["gso"] == want, f"on {os.uname().release}"
    assert got["dev_gso"] == (1 if want["tcpv4"] else 0) | (2 if want["udp_l4"] else 0)
    # the probe wrote to a device still down: nothing reached the stack
    assert "fpprobe0" not in nsx(ns, "ip", "link").stdout


def test_forcing_the_probe_and_a_bad_setting(lab):
    ns = lab.host("h1", "172.16.1.1")
    r = probe(ns, "tun", "-udp_l4,+tcpv4")
    assert json.loads(r.stdout)["gso"] == {"tcpv4": True, "udp_l4": False}
    r = probe(ns, "tun", "udp_l4")
    assert r.returncode != 0 and "FANPKT_OFFLOADS: 'udp_l4' is not +NAME or -NAME" in r.stderr


def two_hosts(lab, fan, forced):
    env = {"FANPKT_OFFLOADS": forced} if forced else None
    hosts = []
    for i in (1, 2):
        addr = f"172.16.{i}.1"
        ns = lab.host(f"h{i}", addr)
        lab.forward(ns, *FANS[fan], "-u", f"{addr}/16", env=env)
        hosts.append(ns)
    return hosts


def udp_burst(src, dst, dst_addr, n=64, size=100, port=7010) -> dict:
    """n datagrams of size bytes, numbered, sent back to back from src: what dst got."""
    sink = start(dst, *TRAFFIC, "udp-flows-sink", str(port), "1")
    try:
        nsx(src, *TRAFFIC, "udp-burst", dst_addr, str(port), str(n), str(size))
        return json.loads(sink.communicate(timeout=60)[0])
    finally:
        sink.kill()


MERGING = {"": "probed", "-udp_l4": "udp-merge-off", "+udp_l4": "udp-merge-forced"}
CASES = [(fan, forced) for fan in ("ipip", "vxlan") for forced in MERGING] + \
    [("vxlan-kernel-path", "")]         # no TUN/TAP writes there to force


@pytest.mark.parametrize("fan,forced", CASES, ids=[f"{f}-{MERGING[m]}" for f, m in CASES])
def test_two_hosts_ping_tcp_and_a_udp_burst(lab, fan, forced):
    h1, h2 = two_hosts(lab, fan, forced)
    assert ping(h1, "241.2.1.1").returncode == 0
    assert ping(h2, "241.1.1.1").returncode == 0
    if not forced:
        sent, got = tcp_transfer(h1, h2, "241.2.1.1", 4 << 20)
        assert sent == got and int(got[0]) == 4 << 20
    for _ in range(3):
        got = udp_burst(h1, h2, "241.2.1.1")
        assert list(got["flows"].values()) == [64] and got["reordered"] == 0, got
    stats = json.loads(nsx(h2, *FANPKT, "stats", "--json").stdout)
    total = stats["total"]
    assert total["drop_rx_tun_write"] == 0, total
    fans = {f["device"]: f for f in stats["fans"]}
    if fan == "vxlan-kernel-path":
        assert fans["fan-241"]["datapath"] == "kernel", fans
        # the eBPF counters reach the counter file every 0.1 s
        poll(lambda: json.loads(nsx(h2, *FANPKT, "stats", "--json").stdout)["total"]
             ["rx_packets"] >= 3 * 64, "the kernel path's counters never arrived")
        return
    udp_l4 = {"": kernel() >= UDP_L4_SINCE, "-udp_l4": False, "+udp_l4": True}[forced]
    assert fans["fan-241"]["offloads"] == {"gso_tcpv4": True, "gso_udp_l4": udp_l4}, fans
    # `fanpkt stats` says so where a kernel lacks it
    text = nsx(h2, *FANPKT, "stats").stdout
    assert ("; without gso_udp_l4" in text) == (not udp_l4), text
    if forced == "+udp_l4" and kernel() < UDP_L4_SINCE:
        # merged, refused, written one by one: at most once per receive loop
        assert total["rx_gso_fallback"] <= len(stats["loops"]), total
    else:
        assert total["rx_gso_fallback"] == 0, total
