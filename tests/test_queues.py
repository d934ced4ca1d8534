"""Many cores (docs/internals.md §8): a multi-queue TUN/TAP with one transmit loop per queue, VXLAN
receive spread over an SO_REUSEPORT group, decapsulated packets written to their flow's
queue. Checked on real traffic: many flows use every queue and every receive loop, and
no flow's packets are reordered on the way."""
from __future__ import annotations

import json
import subprocess

import pytest

from fanpkt.config import MAX_QUEUES, default_queues

from lab import FANPKT, FORWARD, TRAFFIC, nsx, ping, start

FLOWS, PER_FLOW = 16, 1500      # 16 flows on 2 queues: all on one has odds 2^-15


def loop_counts(ns, prefix: str, counter: str) -> dict:
    loops = json.loads(nsx(ns, *FANPKT, "stats", "--json").stdout)["loops"]
    return {k: v[counter] for k, v in loops.items() if k == prefix or
            k.startswith(prefix + ":")}


@pytest.mark.parametrize("kind", ["ipip", "vxlan"])
def test_flows_use_every_queue_and_stay_in_order(lab, kind):
    h1 = lab.host("h1", "172.16.1.1")
    h2 = lab.host("h2", "172.16.2.1")
    for ns, addr in ((h1, "172.16.1.1"), (h2, "172.16.2.1")):
        # the userspace engine's queues: a VXLAN fan would take the kernel path by default
        lab.forward(ns, "-o", "241.0.0.0/8", "-u", f"{addr}/16", "--type", kind,
                    "--datapath", "user", "--queues", "2")
    assert nsx(h1, "cat", "/sys/class/net/fan-241/tun_flags").stdout.strip() != ""
    assert ping(h1, "241.2.1.1").returncode == 0
    rx = "rx-vxlan:8472" if kind == "vxlan" else "rx"
    before = loop_counts(h2, rx, "rx_packets")
    sink = start(h2, *TRAFFIC, "udp-flows-sink", "7100", "2")
    nsx(h1, *TRAFFIC, "udp-flows", "241.2.1.1", "7100", str(FLOWS), str(PER_FLOW),
        timeout=120)
    got = json.loads(sink.communicate(timeout=120)[0])
    assert got["reordered"] == 0, got
    assert len(got["flows"]) == FLOWS and min(got["flows"].values()) > PER_FLOW // 2, got
    sent = loop_counts(h1, "tx:fan-241", "tx_packets")
    assert set(sent) == {"tx:fan-241", "tx:fan-241:q1"} and min(sent.values()) > 0, sent
    # the receiving loops: a VXLAN port's, one per socket of its SO_REUSEPORT group; or
    # IPIP's, one per raw socket, each taking its share by its filter
    taken = loop_counts(h2, rx, "rx_packets")
    taken = {k: v - before[k] for k, v in taken.items()}
    assert set(taken) == {rx, rx + ":q1"} and min(taken.values()) > 0, taken
    # each datagram taken by one loop only: never more than were sent
    assert 0.9 * FLOWS * PER_FLOW <= sum(taken.values()) <= FLOWS * PER_FLOW, taken
    # IPIP: datagrams of a flow a few apart in a burst went to the TUN as UDP GSO
    # superpackets (the kernel split them again: the sink saw each, in order). VXLAN's
    # receive joins only neighbouring frames, and these flows take turns.
    if kind == "ipip":
        merged = loop_counts(h2, rx, "rx_gro_merged")
        assert sum(merged.values()) > 0, merged
    # TCP: h2 writes each flow's data to a queue by the flow's hash, and the TUN/TAP sends
    # a flow's replies (the ACKs) through the queue that wrote it: so h2's ACKs of many
    # flows leave through every queue too, and every byte arrives intact.
    before = loop_counts(h2, "tx:fan-241", "tx_packets")
    sinks = [start(h2, *TRAFFIC, "tcp-sink", str(5100 + i)) for i in range(FLOWS)]
    senders = [subprocess.Popen(["ip", "netns", "exec", h1, *TRAFFIC, "tcp-send",
                                 "241.2.1.1", str(5100 + i), str(1 << 19)],
                                stdout=subprocess.PIPE, text=True) for i in range(FLOWS)]
    for snd, sink in zip(senders, sinks):
        assert snd.communicate(timeout=120)[0].split() == \
            sink.communicate(timeout=120)[0].split()
    after = loop_counts(h2, "tx:fan-241", "tx_packets")
    # (all of them through one queue, bar a few before the first write, if h2 wrote
    # every flow to queue 0: 520 against 5 in one trial)
    acks = {k: after[k] - before[k] for k in after}
    assert min(acks.values()) > 0.1 * sum(acks.values()), acks


def test_one_queue_is_the_single_queue_device(lab):
    h1 = lab.host("h1", "172.16.1.1")
    lab.forward(h1, "-o", "241.0.0.0/8", "-u", "172.16.1.1/16", "--queues", "1")
    flags = int(nsx(h1, "cat", "/sys/class/net/fan-241/tun_flags").stdout, 16)
    assert not flags & 0x0100                       # IFF_MULTI_QUEUE
    loops = json.loads(nsx(h1, *FANPKT, "stats", "--json").stdout)["loops"]
    assert set(loops) == {"rx", "tx:fan-241"}


@pytest.mark.parametrize("value", ["0", "9", "two", "²"])
def test_bad_queue_counts_are_refused(lab, value):
    h1 = lab.host("h1", "172.16.1.1")
    r = nsx(h1, *FORWARD, "-o", "241.0.0.0/8", "-u", "172.16.1.1/16", "--queues", value,
            check=False)
    assert r.returncode == 2 and "--queues" in r.stderr and "Traceback" not in r.stderr
    assert nsx(h1, "ip", "link", "show", "fan-241", check=False).returncode != 0


def test_the_engine_holds_as_many_queues_as_the_config_allows():
    import dataclasses
    from fanpkt.engine import MapRow, fastpath
    from fanpkt.fanmap import FanMap
    row = MapRow.of(FanMap.parse("241.0.0.0/8", "172.16.3.4/16"), tun_fd=3)
    fastpath.Engine([dataclasses.replace(row, queue_fds=tuple(range(3, 3 + MAX_QUEUES)))])
    with pytest.raises(ValueError, match="bad queues"):
        fastpath.Engine([dataclasses.replace(row, queue_fds=tuple(range(3, 4 + MAX_QUEUES)))])


def test_default_is_one_queue_per_cpu_capped():
    import os
    assert default_queues() == min(len(os.sched_getaffinity(0)), MAX_QUEUES)


def test_stats_show_what_the_kernel_dropped_at_the_fan_device(lab):
    """Packets the TUN's queue had no room for never reach fanpkt; `fanpkt stats` shows
    the kernel's own count for each fan device. Here the queue holds one packet, the
    forwarder is stopped, and ping sends 200 at once."""
    import signal
    h1 = lab.host("h1", "172.16.1.1")
    p = lab.forward(h1, "-o", "241.0.0.0/8", "-u", "172.16.1.1/16", "--queues", "1")
    nsx(h1, "ip", "link", "set", "fan-241", "txqueuelen", "1")
    p.send_signal(signal.SIGSTOP)           # nothing reads the TUN: its queue holds one
    try:
        nsx(h1, "ping", "-q", "-c", "200", "-l", "200", "-W", "1", "241.2.1.1", check=False)
    finally:
        p.send_signal(signal.SIGCONT)
    snap = json.loads(nsx(h1, *FANPKT, "stats", "--json").stdout)
    link = json.loads(nsx(h1, "ip", "-s", "-j", "link", "show", "fan-241").stdout)[0]
    assert snap["devices"]["fan-241"] == {"tx_dropped": link["stats64"]["tx"]["dropped"],
                                          "rx_dropped": link["stats64"]["rx"]["dropped"]}
    assert snap["devices"]["fan-241"]["tx_dropped"] > 0
    assert snap["total"]["tx_packets"] + snap["devices"]["fan-241"]["tx_dropped"] >= 200
    tx, rx = link["stats64"]["tx"]["dropped"], link["stats64"]["rx"]["dropped"]
    # per fan, only what is not zero
    lines = nsx(h1, *FANPKT, "stats").stdout.splitlines()
    assert f"  kernel at fan-241: tx_dropped {tx:,}" + (f", rx_dropped {rx:,}" if rx else "") \
        in lines
    # --all: every fan device, both counts
    text = nsx(h1, *FANPKT, "stats", "--all").stdout.split("kernel, at the fan devices:\n")[1]
    assert text.split() == ["fan-241", "tx_dropped", str(tx), "rx_dropped", str(rx)]


SNIFF_IDS = """
import json, socket, struct, sys, time
want, timeout = int(sys.argv[1]), float(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
s.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)      # SO_RCVBUFFORCE: miss nothing
s.bind(("eth0", 0))
s.settimeout(0.5)
print("listening", flush=True)
ids, end = [], time.monotonic() + timeout
while len(ids) < want and time.monotonic() < end:
    try:
        f = s.recv(65536)
    except socket.timeout:
        continue
    ip = f[14:]
    if ip[9] == 4 and ip[12:16] == bytes([172, 16, 1, 1]):    # IPIP from h1
        ids.append(struct.unpack_from("!H", ip, 4)[0])
print(json.dumps(ids))
"""


def test_outer_ip_ids_are_unique_across_loops(lab):
    """With --queues 2 both transmit loops send to one host at once: their outer IP IDs
    come from one host-wide sequence, so no two packets to it share an ID (each loop
    counting from 0 would send each ID twice; outer fragments could then be joined
    across packets)."""
    h1 = lab.host("h1", "172.16.1.1")
    h2 = lab.host("h2", "172.16.2.1")
    for ns, addr in ((h1, "172.16.1.1"), (h2, "172.16.2.1")):
        lab.forward(ns, "-o", "241.0.0.0/8", "-u", f"{addr}/16", "--queues", "2")
    assert ping(h1, "241.2.1.1").returncode == 0
    n = FLOWS * 100
    sniffer = start(h2, "python3", "-c", SNIFF_IDS, str(n), "30")
    sink = start(h2, *TRAFFIC, "udp-flows-sink", "7100", "2")
    nsx(h1, *TRAFFIC, "udp-flows", "241.2.1.1", "7100", str(FLOWS), "100", timeout=120)
    sink.communicate(timeout=120)
    ids = json.loads(sniffer.communicate(timeout=90)[0])
    sent = loop_counts(h1, "tx:fan-241", "tx_packets")
    assert min(sent.values()) > 0, sent                 # both loops sent
    assert len(ids) >= 0.9 * n
    assert len(set(ids)) == len(ids), sorted(i for i in set(ids) if ids.count(i) > 1)[:10]
