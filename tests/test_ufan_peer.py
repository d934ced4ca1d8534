"""fanpkt against a real Ubuntu Fan host: Ubuntu's own kernel with Canonical's fan patches
for ipip and vxlan, booted in qemu by the external ufan-peer harness (found beside this
repository at ../shared/ufan-peer, as CI lays it out). The guest is Fan host 172.16.9.9
(slice 241.9.9.0/24, a container at 241.9.9.2) for 241.0.0.0/8 over 172.16.0.0/16; its NIC
is a TAP in a namespace where this host's underlay address 172.16.3.4/16 lives.

Where the harness is present these tests run and must pass; a peer that does not boot or
answer is a failure. Without the harness (a checkout on its own) they are skipped."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab import FORWARD, TRAFFIC, nsx, ping, poll, sh, start

PEER = Path(__file__).resolve().parents[2] / "shared" / "ufan-peer" / "ufan-peer"
GUEST, GUEST_CT = "241.9.9.1", "241.9.9.2"


class UfanPeer:
    """One booted guest; its namespace carries the lab's prefix."""

    def __init__(self, lab, mode: str):
        self.ns = f"{lab.prefix}uf"
        self.env = {**os.environ, "UFAN_NS": self.ns, "UFAN_TAP": "uftap",
                    "UFAN_RUN": f"/tmp/ufan-peer-{self.ns}"}
        r = subprocess.run([str(PEER), "up", mode], env=self.env, capture_output=True,
                           text=True, timeout=180)
        assert r.returncode == 0, f"ufan-peer did not boot: {r.stdout}{r.stderr}"

    def run(self, command: str, timeout: int = 60) -> subprocess.CompletedProcess:
        """A busybox sh command in the guest ('ct ...' for its container)."""
        return subprocess.run([str(PEER), "exec", "-t", str(timeout), command],
                              env=self.env, capture_output=True, text=True,
                              timeout=timeout + 60)

    def down(self) -> None:
        subprocess.run([str(PEER), "down"], env=self.env, capture_output=True, timeout=60)
        shutil.rmtree(self.env["UFAN_RUN"], ignore_errors=True)    # its initrd, its logs


@pytest.fixture
def peer(lab):
    if not PEER.exists():
        pytest.skip(f"no ufan-peer harness at {PEER}")
    peers = []

    def boot(mode):
        peers.append(UfanPeer(lab, mode))
        return peers[-1]
    try:
        yield boot
    finally:
        for p in peers:
            p.down()


def fanpkt_on_peer_host(lab, p, *args):
    """fanpkt-forward in the peer's namespace, as host 172.16.3.4 (slice 241.3.4.0/24)."""
    lab.logs.setdefault(p.ns, f"/tmp/{p.ns}-fwd.log")
    return lab.forward(p.ns, "-o", "241.0.0.0/8", "-u", "172.16.3.4/16", *args)


def guest_ping(p, dst, ct=False):
    r = p.run(f"{'ct ' if ct else ''}ping -c 2 -W 3 {dst}")
    return r.returncode == 0 and " 0% packet loss" in r.stdout


def transfer_both_ways(p, host_ns, host_addr, guest_addr, nbytes=2 << 20):
    """Guest -> fanpkt host and fanpkt host -> guest, SHA-256 compared at both ends."""
    sink = start(host_ns, *TRAFFIC, "tcp-sink", "5001")
    try:
        r = p.run(f"dd if=/dev/urandom of=/tmp/f bs=1024 count={nbytes // 1024} "
                  f"2>/dev/null; sha256sum /tmp/f; nc -w 3 {host_addr} 5001 < /tmp/f",
                  timeout=120)
        got = sink.communicate(timeout=120)[0].split()
    finally:
        sink.kill()
    assert r.stdout.split()[0] == got[1] and int(got[0]) == nbytes, (r.stdout, got)
    ct = "ct " if guest_addr == GUEST_CT else ""
    assert p.run(f"{ct}nc -l -p 5002 > /tmp/g &").returncode == 0
    poll(lambda: ":5002" in p.run(f"{ct}netstat -ltn").stdout, "the guest's nc never listened")
    sent = nsx(host_ns, *TRAFFIC, "tcp-send", guest_addr, "5002", str(nbytes),
               timeout=180).stdout.split()
    r = p.run("sha256sum /tmp/g")
    assert r.stdout.split()[0] == sent[1], (r.stdout, sent)


@pytest.mark.parametrize("mode", ["vxlan", "vxlan-kernel-path", "ipip"])
def test_real_ubuntu_fan_kernel(lab, peer, mode):
    """vxlan: fanpkt's userspace engine; vxlan-kernel-path: fanpkt's fan on this kernel's
    own vxlan driver, steered by fanpkt's eBPF programs (fanpkt/kernelpath.py)."""
    p = peer(mode.split("-")[0])
    fanpkt_on_peer_host(lab, p, *{"vxlan": ["--type", "vxlan", "--datapath", "user"],
                                  "ipip": [],
                                  "vxlan-kernel-path": ["--type", "vxlan", "--datapath",
                                                        "kernel"]}[mode])
    assert ping(p.ns, GUEST).returncode == 0                      # fanpkt host -> guest
    assert ping(p.ns, GUEST_CT).returncode == 0                   # -> its container
    assert guest_ping(p, "241.3.4.1")                             # guest -> fanpkt host
    assert guest_ping(p, "241.3.4.1", ct=True)                    # container -> fanpkt
    if mode != "ipip":
        # ARP crossed the fan both ways: each side holds the other's bridge MAC
        neigh = nsx(p.ns, "ip", "neigh", "show", GUEST, "dev", "fanbr-241").stdout
        assert re.search(r"lladdr ([0-9a-f]{2}:){5}[0-9a-f]{2}", neigh), neigh
        assert "241.3.4.1" in p.run("ip neigh show dev fanbr").stdout
    transfer_both_ways(p, p.ns, "241.3.4.1", GUEST_CT)
    s = lab.stats(p.ns)
    assert s["drop_rx_spoofed_src"] == s["drop_rx_src_not_underlay"] == 0
    assert s["drop_rx_bad_inner"] == s["drop_rx_bad_vxlan"] == s["drop_rx_unknown_vni"] == 0


@pytest.mark.parametrize("datapath", ["user", "kernel"])
def test_mixed_fan_guest_kernel_and_two_fanpkt_hosts(lab, peer, datapath):
    """Every host of a VXLAN fan made of the Ubuntu kernel and two fanpkt hosts reaches
    every other: the guest's underlay is bridged to a second fanpkt host. With datapath
    kernel the first fanpkt host runs its fan on the kernel path and the second on the
    userspace engine: the Ubuntu fan, fanpkt's kernel path and fanpkt's engine in one
    fan."""
    p = peer("vxlan")
    # the peer's TAP joins a bridge that now holds 172.16.3.4, and a second host 172.16.5.5
    nsx(p.ns, "ip", "link", "add", "ul0", "type", "bridge")
    nsx(p.ns, "ip", "addr", "del", "172.16.3.4/16", "dev", "uftap")
    nsx(p.ns, "ip", "link", "set", "uftap", "master", "ul0")
    nsx(p.ns, "ip", "addr", "add", "172.16.3.4/16", "dev", "ul0")
    nsx(p.ns, "ip", "link", "set", "ul0", "up")
    h2 = f"{lab.prefix}h2"
    lab._add_ns(h2)
    sh("ip", "link", "add", "eth0", "netns", h2, "type", "veth", "peer", "name", "p2",
       "netns", p.ns)
    nsx(p.ns, "ip", "link", "set", "p2", "master", "ul0", "up")
    nsx(h2, "ip", "addr", "add", "172.16.5.5/16", "dev", "eth0")
    nsx(h2, "ip", "link", "set", "eth0", "up")
    nsx(h2, "ip", "link", "set", "lo", "up")
    fanpkt_on_peer_host(lab, p, "--type", "vxlan", "--datapath", datapath)
    lab.forward(h2, "-o", "241.0.0.0/8", "-u", "172.16.5.5/16", "--type", "vxlan",
                "--datapath", "user")
    for ns, others in ((p.ns, [GUEST, GUEST_CT, "241.5.5.1"]),
                       (h2, [GUEST, GUEST_CT, "241.3.4.1"])):
        for dst in others:
            assert ping(ns, dst).returncode == 0, (ns, dst)
    for dst in ("241.3.4.1", "241.5.5.1"):
        assert guest_ping(p, dst) and guest_ping(p, dst, ct=True), dst
    sent, got = None, None
    sink = start(h2, *TRAFFIC, "tcp-sink", "5003")
    try:
        sent = nsx(p.ns, *TRAFFIC, "tcp-send", "241.5.5.1", "5003", str(8 << 20),
                   timeout=120).stdout.split()
        got = sink.communicate(timeout=60)[0].split()
    finally:
        sink.kill()
    assert sent == got


def test_forward_command_is_importable_from_a_fresh_interpreter():
    """The lab starts forwarders with this exact command; a cheap guard for the tests
    above, which would otherwise fail only inside a booted peer."""
    r = subprocess.run([*FORWARD, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--type" in r.stdout, r.stderr
    assert sys.executable in FORWARD[0]
