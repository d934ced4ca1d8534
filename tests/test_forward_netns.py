"""fanpkt-forward end to end: real namespaces, veths, TUN devices and raw sockets.

Each test builds its own underlay (172.16.0.0/16 on a bridge in a switch namespace), starts
forwarders as operators do, and checks what arrives with ordinary tools and sockets.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lab import (DHCP_DISCOVER, FANPKT, FORWARD, bulk_checks, dnsmasq_in, nsx, ping, poll, sh,
                 start, tcp_transfer)

FAN = ["-o", "241.0.0.0/8"]


def resolved_hosts(lab, send):
    """two_hosts with --underlay-send `send`, each past its first packets to the other: in
    frames mode once the forwarder sends h2 frames, else once a ping went through."""
    h1, h2, _, _ = two_hosts(lab, "--underlay-send", send)
    if send == "frames":
        wait_for_frames(lab, h1, "241.2.1.1")
    else:
        assert ping(h1, "241.2.1.1").returncode == 0
    return h1, h2


def two_hosts(lab, *extra):
    h1 = lab.host("h1", "172.16.1.1")
    h2 = lab.host("h2", "172.16.2.1")
    p1 = lab.forward(h1, *FAN, "-u", "172.16.1.1/16", *extra)
    p2 = lab.forward(h2, *FAN, "-u", "172.16.2.1/16", *extra)
    return h1, h2, p1, p2


def test_two_hosts_ping_tcp_udp(lab):
    h1, h2, _, _ = two_hosts(lab)
    assert ping(h1, "241.2.1.1").returncode == 0
    assert ping(h2, "241.1.1.1").returncode == 0
    bulk_checks(lab, h1, h2, "241.2.1.1", 1480)


def wait_for_frames(lab, ns, dst, timeout=10):
    """Ping until the forwarder has the peer in its neighbour table and sends it frames."""
    sent = lab.stats(ns)["tx_l2"]

    def framed():
        ping(ns, dst, count=1)
        return lab.stats(ns)["tx_l2"] > sent
    poll(framed, "no frame sent to a resolved neighbour", timeout)


def forwarder_logged(lab, ns, text, timeout=10):
    """Wait until the forwarder in ns has logged text (it logs each change it follows)."""
    poll(lambda: text in open(lab.logs[ns]).read(), f"forwarder never logged {text!r}",
         timeout)


def test_frames_follow_the_kernels_neighbour_table(lab):
    h1, h2, _, _ = two_hosts(lab)
    wait_for_frames(lab, h1, "241.2.1.1")
    before = lab.stats(h1)
    sent, got = tcp_transfer(h1, h2, "241.2.1.1", 16 << 20)
    assert sent == got and int(got[0]) == 16 << 20
    after = lab.stats(h1)
    assert after["tx_l2"] - before["tx_l2"] == after["tx_packets"] - before["tx_packets"]
    # The peer's MAC changes and the kernel learns the new one (as from a gratuitous ARP):
    # frames follow within a refresh.
    nsx(h2, "ip", "link", "set", "eth0", "address", "02:00:00:00:02:22")
    nsx(h1, "ip", "neigh", "replace", "172.16.2.1", "lladdr", "02:00:00:00:02:22", "nud",
        "reachable", "dev", "eth0")

    def answered_by_frames():
        before = lab.stats(h1)["tx_l2"]
        return ping(h1, "241.2.1.1", count=1).returncode == 0 and \
            lab.stats(h1)["tx_l2"] > before
    poll(answered_by_frames, "pings answered through frames to the peer's new MAC")


def test_frames_stop_when_a_route_sends_the_peer_through_a_gateway(lab):
    """The kernel would now send h2's packets to a gateway: frames straight to h2 must end
    on the route change, not when the cached route verdict expires (30 s), and resume when
    the route goes."""
    h1, _, _, _ = two_hosts(lab)
    wait_for_frames(lab, h1, "241.2.1.1")
    # 172.16.9.9 does not exist: through the kernel's path the pings go unanswered.
    nsx(h1, "ip", "route", "add", "172.16.2.1/32", "via", "172.16.9.9", "dev", "eth0")

    def no_more_frames():
        before = lab.stats(h1)["tx_l2"]
        ping(h1, "241.2.1.1", count=1)
        return lab.stats(h1)["tx_l2"] == before
    poll(no_more_frames, "frames still go straight to a peer routed through a gateway")
    before = lab.stats(h1)
    assert ping(h1, "241.2.1.1").returncode != 0
    after = lab.stats(h1)
    assert after["tx_packets"] - before["tx_packets"] == 3
    assert after["tx_l2"] == before["tx_l2"]
    nsx(h1, "ip", "route", "del", "172.16.2.1/32")
    wait_for_frames(lab, h1, "241.2.1.1")


SNIFF_IPIP_SOURCE_MAC = """
from scapy.all import IP, sniff
print("listening", flush=True)
p = sniff(iface="eth0", count=1, timeout=10,
          lfilter=lambda p: IP in p and p[IP].proto == 4 and p[IP].src == "172.16.1.1")
print(p[0].src if p else "nothing")
"""


def test_frames_follow_a_new_mac_of_the_underlay_interface(lab):
    """A bond changes its MAC on failover: frames must leave from the new one."""
    h1, h2, _, _ = two_hosts(lab)
    wait_for_frames(lab, h1, "241.2.1.1")
    # The kernel flushes the interface's neighbours; within a refresh the forwarder has the
    # new MAC and an empty table, and frames resume once the kernel has re-resolved h2.
    nsx(h1, "ip", "link", "set", "eth0", "address", "02:00:00:00:01:11")
    forwarder_logged(lab, h1, "frames from 02:00:00:00:01:11")

    def source_mac_of_a_frame():
        """The source MAC h2 sees on one ping of h1's, if the ping left as a frame. Until
        the forwarder has the re-resolved neighbour, pings take the kernel's IP path (a
        frame may also still go to the flushed entry while the refresh that followed the
        MAC finishes): those prove nothing about frames, so the next ping is tried."""
        sniffer = start(h2, sys.executable, "-c", SNIFF_IPIP_SOURCE_MAC)
        try:
            before = lab.stats(h1)["tx_l2"]
            ping(h1, "241.2.1.1", count=1)
            out = sniffer.communicate(timeout=30)[0].split()
        finally:
            sniffer.kill()
        return out if lab.stats(h1)["tx_l2"] > before else None
    assert poll(source_mac_of_a_frame, "no ping of h1's left as a frame", timeout=30,
                every=0.2) == ["02:00:00:00:01:11"]


def test_frames_follow_a_recreated_underlay_interface(lab):
    """A NIC unplugged and plugged back is a new interface with a new index: frames must
    stop while it is gone and leave by the new one once the kernel has resolved h2."""
    h1, _, _, _ = two_hosts(lab)
    wait_for_frames(lab, h1, "241.2.1.1")
    nsx(h1, "ip", "link", "del", "eth0")
    lab.plug(h1, "172.16.1.1")
    wait_for_frames(lab, h1, "241.2.1.1")
    before = lab.stats(h1)
    assert ping(h1, "241.2.1.1").returncode == 0
    after = lab.stats(h1)
    assert after["tx_l2"] - before["tx_l2"] == 3
    assert after["drop_tx_send_error"] == before["drop_tx_send_error"]


def test_an_underlay_address_moving_is_followed_at_once(lab):
    """The underlay address moves to another interface (here a bridge). Its routes go
    and come with it, and their announcements ring the forwarder's doorbell: it follows
    within a refresh, not at its unprompted look every FOLLOW_REFRESH (10 s)."""
    from fanpkt.forwarder import FOLLOW_REFRESH
    h1, _, _, _ = two_hosts(lab)
    wait_for_frames(lab, h1, "241.2.1.1")
    nsx(h1, "ip", "link", "add", "br9", "type", "bridge")
    nsx(h1, "ip", "link", "set", "br9", "up")
    nsx(h1, "ip", "addr", "del", "172.16.1.1/16", "dev", "eth0")
    nsx(h1, "ip", "addr", "add", "172.16.1.1/16", "dev", "br9")
    forwarder_logged(lab, h1, "underlay address 172.16.1.1 now on br9",
                     timeout=FOLLOW_REFRESH / 2)

def test_underlay_send_ip_uses_no_frames(lab):
    h1, h2, _, _ = two_hosts(lab, "--underlay-send", "ip")
    # two seconds of pings: in frames mode the peer would be in the table by then
    assert ping(h1, "241.2.1.1", count=10).returncode == 0
    sent, got = tcp_transfer(h1, h2, "241.2.1.1", 4 << 20)
    assert sent == got
    s1 = lab.stats(h1)
    assert s1["tx_packets"] > 2000 and s1["tx_l2"] == 0


def test_eight_hosts_full_mesh_one_route(lab):
    hosts = [(lab.host(f"h{i}", f"172.16.{i}.{i}"), f"172.16.{i}.{i}") for i in range(1, 9)]
    for ns, addr in hosts:
        lab.forward(ns, *FAN, "-u", f"{addr}/16")
    for ns, addr in hosts:
        routes = nsx(ns, "ip", "-4", "route", "show").stdout.splitlines()
        overlay = [r.split() for r in routes if r.startswith("241.")]
        _, _, c, d = addr.split(".")
        assert len(overlay) == 1, routes            # one route for the whole fan
        route = overlay[0]
        assert (route[0], route[route.index("dev") + 1], route[route.index("src") + 1]) == \
            ("241.0.0.0/8", "fan-241", f"241.{c}.{d}.1"), routes
        assert nsx(ns, "ip", "neigh", "show", "dev", "fan-241").stdout == ""
    for ns, _ in hosts:
        for _, addr in hosts:
            _, _, c, d = addr.split(".")
            assert ping(ns, f"241.{c}.{d}.1", count=1).returncode == 0, (ns, addr)


def test_containers_across_hosts(lab):
    h1, h2, _, _ = two_hosts(lab, "bridge", "fanbr")
    assert "241.1.1.1/24" in nsx(h1, "ip", "-4", "addr", "show", "fanbr").stdout
    c1 = lab.container(h1, "c1", "241.1.1.10", "241.1.1.1")
    c2 = lab.container(h2, "c2", "241.2.1.20", "241.2.1.1")
    assert ping(c1, "241.2.1.20").returncode == 0
    sent, got = tcp_transfer(c1, c2, "241.2.1.20", 8 << 20)
    assert sent == got


def test_dhcp_serves_the_slice_on_the_bridge(lab):
    """`dhcp` (docs/internals.md §5): a DHCPDISCOVER from a container on the fan bridge is
    offered an address above the host reserve, the slice gateway as router and the overlay MTU; the
    dnsmasq goes when the forwarder stops, or at the next start after a crash."""
    h1 = lab.host("h1", "172.16.1.1")
    p1 = lab.forward(h1, *FAN, "-u", "172.16.1.1/16", "bridge", "fanbr", "dhcp",
                     "host-reserve", "9")
    # up means serving: dnsmasq holds the DHCP port before the forwarder says so
    assert "dnsmasq" in nsx(h1, "ss", "-ulpn", "sport = :67").stdout
    cns = f"{lab.prefix}c1"
    lab._add_ns(cns)
    sh("ip", "link", "add", "eth0", "netns", cns, "type", "veth", "peer", "name", "vc1",
       "netns", h1)
    nsx(h1, "ip", "link", "set", "vc1", "master", "fanbr", "up")
    nsx(cns, "ip", "link", "set", "eth0", "up")
    client = start(cns, sys.executable, "-c", DHCP_DISCOVER)
    out = client.communicate(timeout=60)[0].split()
    assert out[1:] == ["241.1.1.1", "1480", "255.255.255.0", "2"], out    # 2: OFFER
    assert out[0].startswith("241.1.1.") and 10 <= int(out[0].rsplit(".", 1)[1]) <= 254
    first = dnsmasq_in(h1)
    assert len(first) == 1
    # a crash leaves the dnsmasq running; the next start ends it and starts its own
    lab.stop(p1, signal.SIGKILL)
    assert dnsmasq_in(h1) == first
    p2 = lab.forward(h1, *FAN, "-u", "172.16.1.1/16", "bridge", "fanbr", "dhcp",
                     "host-reserve", "9")
    second = dnsmasq_in(h1)
    assert len(second) == 1 and second != first
    assert lab.stop(p2) == 0
    assert dnsmasq_in(h1) == []


def test_multiple_fans_one_process(lab, tmp_path):
    h1 = lab.host("h1", "172.16.1.1")
    h2 = lab.host("h2", "172.16.2.1")
    for ns, addr in ((h1, "172.16.1.1"), (h2, "172.16.2.1")):
        conf = tmp_path / f"fan-{ns}"
        conf.write_text(f"241.0.0.0/8 {addr}/16\n10.0.0.0/8 {addr}/16\n250 {addr}/16 off\n")
        lab.forward(ns, "-c", str(conf))
    show = nsx(h1, *FANPKT, "show").stdout.splitlines()
    assert show[0].split() == ["Bridge", "Underlay", "Overlay", "Flags"] and len(show) == 3
    assert ping(h1, "241.2.1.1").returncode == 0
    assert ping(h1, "10.2.1.1").returncode == 0
    assert nsx(h1, "ip", "link", "show", "fan-250", check=False).returncode != 0


SCAPY_SEND = ("import sys; from scapy.all import IP, ICMP, send; "
              "o, i, d = sys.argv[1:4]; "
              "send(IP(src=o, dst=d)/IP(src=i, dst='241.2.1.1')/ICMP(id=77), count=5, "
              "verbose=0)")


def hostile(lab, evil, outer_src, inner_src, dst="172.16.2.1"):
    nsx(evil, sys.executable, "-c", SCAPY_SEND, outer_src, inner_src, dst)


def count_prot_unreach(lab, ns):
    """A test-owned nft counter after the output hook: what really leaves the host."""
    out = nsx(ns, "nft", "list", "table", "ip", "fptest").stdout
    return int(out.split("packets ")[1].split()[0])


def watch_prot_unreach(ns):
    nsx(ns, "nft", "-f", "-", input="table ip fptest {\n chain post {\n  type filter hook "
        "postrouting priority 300; policy accept;\n  icmp type destination-unreachable "
        "icmp code prot-unreachable counter\n }\n}\n")


@pytest.mark.parametrize("spoof_check", [True, False])
def test_hostile_traffic(lab, spoof_check):
    h1 = lab.host("h1", "172.16.1.1")
    h2 = lab.host("h2", "172.16.2.1")
    evil = lab.host("evil", "172.16.9.9")
    nsx(evil, "ip", "addr", "add", "10.99.0.1/8", "dev", "eth0")
    watch_prot_unreach(h2)
    hostile(lab, evil, "172.16.9.9", "241.9.9.1")       # no fanpkt yet: kernel answers
    before = poll(lambda: count_prot_unreach(lab, h2),   # the watcher does see them
                  "the kernel's protocol-unreachable answers never showed")
    extra = [] if spoof_check else ["--no-spoof-check"]
    lab.forward(h1, *FAN, "-u", "172.16.1.1/16")
    lab.forward(h2, *FAN, "-u", "172.16.2.1/16", *extra)
    hostile(lab, evil, "172.16.9.9", "241.1.1.1")        # h1's slice, from evil's address
    hostile(lab, evil, "10.99.0.1", "241.9.9.1")         # outside the underlay
    want = "drop_rx_spoofed_src" if spoof_check else "rx_packets"
    s = poll(lambda: (lambda s: s if s["drop_rx_src_not_underlay"] == 5 and s[want] >= 5
                      else None)(lab.stats(h2)), "the hostile datagrams were not all counted")
    assert s["drop_rx_src_not_underlay"] == 5
    if spoof_check:
        assert s["drop_rx_spoofed_src"] == 5 and s["rx_packets"] == 0
    else:
        assert s["drop_rx_spoofed_src"] == 0 and s["rx_packets"] == 5
    assert ping(h1, "241.2.1.1").returncode == 0
    assert count_prot_unreach(lab, h2) == before         # none left while fanpkt ran


def test_ipip_to_the_underlay_broadcast_is_dropped(lab):
    """One IPIP datagram to the underlay broadcast reaches every host's raw socket; its
    inner packet is well formed and not spoofed (evil speaks for its own slice), so only
    the outer destination gives it away."""
    h2 = lab.host("h2", "172.16.2.1")
    evil = lab.host("evil", "172.16.9.9")
    lab.forward(h2, *FAN, "-u", "172.16.2.1/16")
    hostile(lab, evil, "172.16.9.9", "241.9.9.1", dst="172.16.255.255")
    s = poll(lambda: (lambda s: s if s["drop_rx_outer_dst"] == 5 else None)(lab.stats(h2)),
             "the broadcast datagrams were not counted")
    assert s["rx_packets"] == 0


def test_host_reserve_address_nobody_holds_does_not_loop(lab):
    """host-reserve 3 without a bridge: slice.2 and slice.3 are the host's to use, but
    nothing holds them. A packet for one comes in, goes to the TUN, and the kernel routes
    it straight back into the TUN: it is dropped there once, not bounced until its TTL
    runs out."""
    h1 = lab.host("h1", "172.16.1.1")
    h2 = lab.host("h2", "172.16.2.1")
    lab.forward(h1, *FAN, "-u", "172.16.1.1/16", "host-reserve", "3")
    lab.forward(h2, *FAN, "-u", "172.16.2.1/16")
    assert ping(h2, "241.1.1.1", count=1).returncode == 0       # the gateway is held
    before, redirects = lab.stats(h1), icmp_redirects(h1)
    assert ping(h2, "241.1.1.2", "-t", "64", count=1).returncode != 0
    s = poll(lambda: (lambda s: s if s["drop_tx_local_unused"] > before["drop_tx_local_unused"]
                      else None)(lab.stats(h1)), "the packet for slice.2 was never dropped")
    assert s["rx_packets"] - before["rx_packets"] == 1
    assert s["drop_tx_local_unused"] - before["drop_tx_local_unused"] == 1
    # All that went back: the kernel's own ICMP redirect (it routed the packet out of the
    # device it came in on), if it sent one.
    assert s["tx_packets"] - before["tx_packets"] == icmp_redirects(h1) - redirects <= 1


def icmp_redirects(ns) -> int:
    out = nsx(ns, "nstat", "-az", "IcmpOutRedirects").stdout
    return int(out.split("IcmpOutRedirects")[1].split()[0])


def test_path_mtu(lab):
    h1, h2, _, _ = two_hosts(lab)
    assert ping(h1, "241.2.1.1", "-M", "do", "-s", "1452", count=2).returncode == 0
    r = ping(h1, "241.2.1.1", "-M", "do", "-s", "1453", count=1)
    assert r.returncode != 0 and "mtu=1480" in (r.stdout + r.stderr).replace(" ", "")
    # fanpkt's own answer: with the TUN MTU raised, the oversize packet reaches fanpkt
    nsx(h1, "ip", "link", "set", "fan-241", "mtu", "1500")
    r = ping(h1, "241.2.1.1", "-M", "do", "-s", "1453", count=1)
    assert "Frag needed and DF set (mtu = 1480)" in r.stdout, r.stdout + r.stderr
    assert lab.stats(h1)["tx_icmp_frag_needed"] >= 1


@pytest.mark.parametrize("send", ["frames", "ip"])
def test_too_big_without_df_crosses_in_fragments(lab, send):
    """With the TUN MTU raised past underlay - 20, a packet without DF no longer fits one
    IPIP packet: it leaves in outer fragments and the far kernel reassembles them."""
    h1, h2 = resolved_hosts(lab, send)
    nsx(h1, "ip", "link", "set", "fan-241", "mtu", "1500")
    assert ping(h1, "241.2.1.1", "-M", "dont", "-s", "1472", count=2).returncode == 0
    s1 = lab.stats(h1)
    assert s1["tx_fragmented"] >= 2 and s1["drop_tx_too_big"] == 0
    assert (s1["tx_l2"] > 0) == (send == "frames")


@pytest.mark.parametrize("send", ["frames", "ip"])
def test_underlay_mtu_lowered_under_a_running_forwarder(lab, send):
    """The underlay socket refuses the packet (EMSGSIZE): fanpkt answers with the MTU that
    fits today, and the sender's next packets of that size pass."""
    h1, h2 = resolved_hosts(lab, send)
    nsx(h1, "ip", "link", "set", "eth0", "mtu", "1400")
    r = ping(h1, "241.2.1.1", "-M", "do", "-s", "1400", count=1)
    assert "Frag needed and DF set (mtu = 1380)" in r.stdout, r.stdout + r.stderr
    s = lab.stats(h1)
    assert s["drop_tx_too_big"] >= 1 and s["tx_icmp_frag_needed"] >= 1
    assert s["drop_tx_send_error"] == 0
    assert ping(h1, "241.2.1.1", "-M", "do", "-s", "1352", count=2).returncode == 0


@pytest.mark.parametrize("send", ["frames", "ip"])
def test_refused_fragments_never_make_icmp(lab, send):
    """A packet without DF too big for the underlay leaves as outer fragments; with the
    underlay MTU lowered under the forwarder, the socket refuses each (EMSGSIZE). A later
    fragment's payload is no IP header: quoting it would forge an ICMP "fragmentation
    needed" from the slice gateway to whatever its bytes say. Ping's 16-byte pattern
    repeats through the payload; the second fragment starts 1452 bytes into the ICMP
    data, pattern index 12, so its fake header reads version/IHL 0x45, flags DF, protocol
    6 and source 172.16.99.99."""
    h1, h2 = resolved_hosts(lab, send)
    nsx(h1, "ip", "link", "set", "fan-241", "mtu", "3000")
    nsx(h1, "ip", "link", "set", "eth0", "mtu", "1400")
    ping(h1, "241.2.1.1", "-M", "dont", "-s", "2972", "-p", "11114000110611ffac10636345111111",
         count=2)
    s = lab.stats(h1)
    assert s["drop_tx_too_big"] >= 4 and s["tx_icmp_frag_needed"] == 0, s


def test_underlay_gro_superpackets_are_delivered(lab):
    """With GRO on the receiver's underlay NIC the kernel merges IPIP segments before the
    raw socket sees them (its IPIP GRO is built in even without the ipip module)."""
    h1, h2, _, _ = two_hosts(lab)
    nsx(h2, "ethtool", "-K", "eth0", "gro", "on", "rx-udp-gro-forwarding", "on")
    nsx(h2, "sh", "-c", "echo 1 > /sys/class/net/eth0/threaded")
    assert ping(h1, "241.2.1.1").returncode == 0
    sent, got = tcp_transfer(h1, h2, "241.2.1.1", 32 << 20)
    assert sent == got and int(got[0]) == 32 << 20
    s2 = lab.stats(h2)
    assert s2["rx_kernel_gro"] > 0 and s2["drop_rx_bad_inner"] == 0


def test_kill9_restart_resumes(lab):
    h1, h2, p1, _ = two_hosts(lab, "bridge", "fanbr")
    flood = subprocess.Popen(["ip", "netns", "exec", h1, "ping", "-f", "-w", "3",
                              "241.2.1.1"], stdout=subprocess.DEVNULL)
    poll(lambda: lab.stats(h1)["tx_packets"] > 100, "the flood never got going")
    p1.kill()
    p1.wait()
    flood.wait()
    assert nsx(h1, "ip", "link", "show", "fanbr", check=False).returncode == 0  # leftover
    lab.forward(h1, *FAN, "-u", "172.16.1.1/16", "bridge", "fanbr")
    assert ping(h1, "241.2.1.1").returncode == 0
    assert "cleaning up after an earlier run" in open(lab.logs[h1]).read()


def test_a_forged_leftover_record_is_not_acted_on(lab, tmp_path):
    """A crashed run's state.json is root's to act on, but it is a file. One that names what
    fanpkt never creates - the underlay NIC as 'our' bridge, an address it does not hold,
    files outside the run directory as dnsmasq's, a process that is no dnsmasq of ours, an
    ip_forward value that is no value - changes nothing; a valid record beside it is still
    cleaned up."""
    import pathlib
    import shutil
    h1 = lab.host("h1", "172.16.1.1")
    run_dir = pathlib.Path(nsx(h1, sys.executable, "-c", "from fanpkt.runstate import "
                               "netns_dir; print(netns_dir())").stdout.strip())
    run_dir.mkdir(mode=0o755, parents=True)
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    bystander = subprocess.Popen(["sleep", "60"])
    nsx(h1, "ip", "link", "add", "fanbr", "type", "bridge")     # a valid leftover
    forged = [
        {"gateway": "241.1.1.1", "bridge": "eth0", "bridge_created": True},
        {"gateway": "241.1.1.1", "bridge": "eth0", "addr": ["eth0", "172.16.1.1", 16]},
        {"gateway": "241.1.1.1", "bridge": "fanbr",
         "dhcp": {"pid": bystander.pid, "pid_file": str(victim),
                  "lease_file": str(victim)}},
        {"gateway": "not an address", "bridge": "fanbr", "bridge_created": True},
        {"gateway": "241.1.1.1", "bridge": "../../x", "bridge_created": True},
        "not even an object",
    ]
    valid = {"gateway": "241.1.1.1", "bridge": "fanbr", "bridge_created": True}
    fans = [{"device": "fan-241", "bridge": r.get("bridge") if isinstance(r, dict) else None,
             "overlay": "241.0.0.0/8", "underlay": "172.16.1.1/16", "slice": "241.1.1.0/24",
             "flags": [], "mtu": 1480, "plumbing": r} for r in forged + [valid]]
    (run_dir / "state.json").write_text(json.dumps({
        "pid": 999999, "config": None, "check_spoof": True, "ip_forward_before": "x; rm",
        "counter_names": [], "counter_block": 64, "fans": fans}))
    try:
        p = lab.forward(h1, *FAN, "-u", "172.16.1.1/16")
        log = open(lab.logs[h1]).read()
        assert "cleaning up after an earlier run" in log
        # the first passes the record check and meets the device check: eth0 is no bridge
        assert "eth0 is no longer a bridge: left alone" in log
        assert log.count("not acting on it") == len(forged) - 1, log
        assert nsx(h1, "ip", "-4", "addr", "show", "eth0").stdout.count("172.16.1.1/16") == 1
        assert victim.read_text() == "keep me" and bystander.poll() is None
        assert nsx(h1, "ip", "link", "show", "fanbr", check=False).returncode != 0
        assert "is not 0 or 1" in log
        assert ping(h1, "241.1.1.1").returncode == 0
        assert lab.stop(p) == 0
    finally:
        bystander.kill()
        bystander.wait()
        shutil.rmtree(run_dir, ignore_errors=True)      # gone with a clean stop anyway


def test_sighup_adds_and_removes(lab, tmp_path):
    h1 = lab.host("h1", "172.16.1.1")
    h2 = lab.host("h2", "172.16.2.1")
    confs = {}
    for ns, addr in ((h1, "172.16.1.1"), (h2, "172.16.2.1")):
        confs[ns] = tmp_path / ns
        confs[ns].write_text(f"241.0.0.0/8 {addr}/16\n")
        lab.forward(ns, "-c", str(confs[ns]))
    procs = dict(zip((h1, h2), lab.procs))
    flood = subprocess.Popen(["ip", "netns", "exec", h1, "ping", "-n", "-i", "0.01", "-c",
                              "300", "241.2.1.1"], stdout=subprocess.PIPE, text=True)
    for ns, addr in ((h1, "172.16.1.1"), (h2, "172.16.2.1")):
        confs[ns].write_text(f"241.0.0.0/8 {addr}/16\n10.0.0.0/8 {addr}/16\n")
        procs[ns].send_signal(signal.SIGHUP)
    poll(lambda: ping(h1, "10.2.1.1", count=1).returncode == 0, "the added fan never came up")
    assert ping(h1, "10.2.1.1").returncode == 0
    out = flood.communicate(timeout=30)[0]
    assert " 0% packet loss" in out, out                 # unchanged fan kept forwarding
    confs[h1].write_text("10.0.0.0/8 172.16.1.1/16\n")
    procs[h1].send_signal(signal.SIGHUP)
    poll(lambda: nsx(h1, "ip", "link", "show", "fan-241", check=False).returncode,
         "the removed fan's device stayed")
    assert ping(h1, "10.2.1.1").returncode == 0


def test_sighup_as_soon_as_a_fan_is_listed(lab, tmp_path):
    """From the moment `fanpkt show` lists a fan, a SIGHUP (systemctl reload) reloads: it
    must never find the default action (death) still in place while start-up finishes."""
    h1 = lab.host("h1", "172.16.1.1")
    conf = tmp_path / "fan"
    conf.write_text("241.0.0.0/8 172.16.1.1/16\n")
    state = f"/run/fanpkt/net-{os.stat(f'/run/netns/{h1}').st_ino}/state.json"

    def listed():       # what `fanpkt show` reads, without its interpreter's start-up time
        try:
            with open(state) as f:
                return bool(json.load(f)["fans"])
        except (OSError, ValueError):
            return False
    for _ in range(5):
        p = lab.forward(h1, "-c", str(conf), wait=False)
        poll(lambda: p.poll() is not None or listed(), "the forwarder never listed its fan",
             timeout=20, every=0.001)
        p.send_signal(signal.SIGHUP)
        forwarder_logged(lab, h1, "forwarding (pid")
        assert p.poll() is None, open(lab.logs[h1]).read()
        assert lab.stop(p) == 0


def test_clean_stop_leaves_nothing(lab):
    h1 = lab.host("h1", "172.16.1.1")
    before = {c: nsx(h1, *c.split()).stdout for c in
              ("ip -4 addr", "ip -4 route", "ip link", "nft list ruleset")}
    fwd_before = nsx(h1, "sysctl", "-n", "net.ipv4.ip_forward").stdout
    p = lab.forward(h1, *FAN, "-u", "172.16.1.1/16", "bridge", "fanbr", "nat")
    assert "snat to 172.16.1.1" in nsx(h1, "nft", "list", "ruleset").stdout
    t0 = time.monotonic()
    assert lab.stop(p) == 0
    # The loops see the stop within POLL_MS; the rest is the kernel tearing devices down,
    # which a loaded machine (the whole suite on two cores) can slow: the one unexplained
    # failure of this test, in a full-suite run, is most likely this bound at 1.5 s. It
    # says "promptly, no hang", not how fast.
    assert time.monotonic() - t0 < 3
    for c, text in before.items():
        assert nsx(h1, *c.split()).stdout == text, c
    assert nsx(h1, "sysctl", "-n", "net.ipv4.ip_forward").stdout == fwd_before
    assert nsx(h1, *FANPKT, "show", check=False).returncode == 6


def forward_once(ns, *args, timeout=20):
    return nsx(ns, *FORWARD, *args, check=False, timeout=timeout)


@pytest.mark.parametrize("args,status,message", [
    (["-o", "241.0.0.0/8", "-u", "172.16.7.7/16"], 5, "not configured on this host"),
    (["-o", "241.0.0.0/8", "-u", "172.16.1.1/16", "bogus"], 2, "unknown flag 'bogus'"),
    (["-o", "241.1.0.0/8", "-u", "172.16.1.1/16"], 2, "not a network address"),
    (["-o", "241.0.0.0/8"], 2, "give both"),
    ([], 2, "no fan given"),
])
def test_errors(lab, args, status, message):
    h1 = lab.host("h1", "172.16.1.1")
    r = forward_once(h1, *args)
    assert r.returncode == status, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert "fan-241" not in nsx(h1, "ip", "link").stdout


def test_error_config_file(lab, tmp_path):
    h1 = lab.host("h1", "172.16.1.1")
    conf = tmp_path / "fan"
    conf.write_text("241.0.0.0/8 172.16.1.1/16\n241.128.0.0/9 172.16.1.1/16\n")
    r = forward_once(h1, "-c", str(conf))
    assert r.returncode == 2 and f"{conf}:2: overlay 241.128.0.0/9 overlaps" in r.stderr


def test_error_device_taken(lab):
    h1 = lab.host("h1", "172.16.1.1")
    nsx(h1, "ip", "link", "add", "fan-241", "type", "bridge")
    r = forward_once(h1, *FAN, "-u", "172.16.1.1/16")
    assert r.returncode == 4 and "device fan-241 already exists" in r.stderr
    assert nsx(h1, *FANPKT, "show", check=False).returncode == 6


@pytest.mark.parametrize("kind", ["ipip", "vxlan"])
def test_error_bridge_names_a_non_bridge(lab, kind):
    """`bridge eth0` (a typo for a bridge's name): exit 11, and the underlay interface keeps
    its MTU and addresses - nothing is changed, nothing left behind."""
    h1 = lab.host("h1", "172.16.1.1")
    before = {c: nsx(h1, *c.split()).stdout for c in ("ip -4 addr", "ip link", "ip -4 route")}
    r = forward_once(h1, *FAN, "-u", "172.16.1.1/16", "type", kind, "bridge", "eth0")
    assert r.returncode == 11, r.stderr
    assert r.stderr.strip().splitlines() == [
        "fanpkt: eth0 exists and is not a bridge: name a bridge (or a free name) with "
        "'bridge NAME'"], r.stderr
    for c, text in before.items():
        assert nsx(h1, *c.split()).stdout == text, c
    assert nsx(h1, *FANPKT, "show", check=False).returncode == 6


def test_error_not_root(lab):
    h1 = lab.host("h1", "172.16.1.1")
    r = nsx(h1, "setpriv", "--bounding-set=-net_admin,-net_raw", "--inh-caps=-all",
            *FORWARD, *FAN, "-u", "172.16.1.1/16", check=False)
    assert r.returncode == 3 and "must run as root" in r.stderr and "Traceback" not in r.stderr


def test_error_no_dev_net_tun(lab):
    h1 = lab.host("h1", "172.16.1.1")
    script = "mount -t tmpfs none /dev/net && exec \"$@\""
    r = nsx(h1, "unshare", "-m", "sh", "-c", script, "sh", *FORWARD, *FAN, "-u",
            "172.16.1.1/16", check=False)
    assert r.returncode == 4 and "/dev/net/tun does not exist" in r.stderr


def test_error_already_running(lab):
    h1 = lab.host("h1", "172.16.1.1")
    lab.forward(h1, *FAN, "-u", "172.16.1.1/16")
    r = forward_once(h1, "-o", "10.0.0.0/8", "-u", "172.16.1.1/16")
    assert r.returncode == 7 and "already running" in r.stderr
    assert ping(h1, "241.1.1.1", count=1).returncode == 0


FORGE_FRAG_NEEDED = """
import sys
from scapy.all import ICMP, IP, Raw, send
victim, peer = sys.argv[1:3]
quoted = IP(src=victim, dst=peer, proto=4, len=1420, flags="DF") / Raw(bytes(8))
send(IP(src=peer, dst=victim) / ICMP(type=3, code=4, nexthopmtu=552) / quoted, verbose=0)
"""


def test_a_forged_frag_needed_does_not_shrink_the_path(lab):
    """Anyone can forge "fragmentation needed, MTU 552" quoting h1 -> h2 protocol 4, with
    predictable fan addresses. The kernel of h1 takes it; fanpkt's raw socket must not:
    it keeps sending DF packets up to the device MTU (IP_PMTUDISC_PROBE)."""
    h1, h2, _, _ = two_hosts(lab, "--underlay-send", "ip")
    assert ping(h1, "241.2.1.1", "-M", "do", "-s", "1400", count=1).returncode == 0
    evil = lab.host("evil", "172.16.9.9")
    nsx(evil, sys.executable, "-c", FORGE_FRAG_NEEDED, "172.16.1.1", "172.16.2.1")
    poll(lambda: "mtu 552" in nsx(h1, "ip", "route", "get", "172.16.2.1").stdout,
         "h1's kernel never took the forged ICMP (the test would prove nothing)")
    r = ping(h1, "241.2.1.1", "-M", "do", "-s", "1400", count=2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert lab.stats(h1)["drop_tx_too_big"] == 0
