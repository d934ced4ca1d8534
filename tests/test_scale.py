"""Scale: a 32-host IPIP fan on one lab underlay, every host a fanpkt-forward: full-mesh
reachability (each host pings every other's gateway) and the RSS of each forwarder,
printed (bench/scale.py writes it to bench/results/scale.{json,md})."""
from __future__ import annotations

import signal
import subprocess
import sys


N_HOSTS = 32

# One process per host pings all the others at once (ICMP echo on a raw socket), and
# asks again every 0.2 s for those that have not answered yet, for up to 10 s: the first
# echo to a host may wait for ARP on the underlay. Prints the addresses that never
# answered.
PING_ALL = r"""
import os, select, socket, struct, sys, time
targets = set(sys.argv[1:])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ident = os.getpid() & 0xFFFF

def echo(seq):
    h = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"fanpkt-scale"
    c = sum(struct.unpack(f"!{len(h) // 2}H", h))
    c = (c & 0xFFFF) + (c >> 16)
    return h[:2] + struct.pack("!H", ~(c + (c >> 16)) & 0xFFFF) + h[4:]

answered, seq, deadline = set(), 0, time.monotonic() + 10
while targets - answered and time.monotonic() < deadline:
    seq += 1
    for t in targets - answered:
        s.sendto(echo(seq), (t, 0))
    until = time.monotonic() + 0.2
    while time.monotonic() < until:
        if not select.select([s], [], [], max(0, until - time.monotonic()))[0]:
            break
        data, (src, _) = s.recvfrom(2048)
        ihl = (data[0] & 15) * 4
        if data[ihl] == 0 and struct.unpack_from("!H", data, ihl + 4)[0] == ident:
            answered.add(src)
print(" ".join(sorted(targets - answered)))
"""


def gateway(i: int) -> str:
    return f"241.{i}.1.1"           # 241.0.0.0/8 over 172.16.0.0/16: host 172.16.i.1


def fan_mesh(lab, n: int = N_HOSTS) -> dict:
    """n hosts, each running fanpkt-forward; once every host has pinged every other,
    returns {host: (unreached gateways, RSS kB, counters)}."""
    hosts = [lab.host(f"h{i}", f"172.16.{i}.1") for i in range(1, n + 1)]
    procs = [lab.forward(ns, "-o", "241.0.0.0/8", "-u", f"172.16.{i}.1/16", wait=False,
                         ready=True)
             for i, ns in enumerate(hosts, 1)]
    try:
        for ns, p in zip(hosts, procs):
            lab.wait_ready(ns, p, timeout=120)      # 32 interpreters start at once
        pingers = [subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", PING_ALL,
                                     *(gateway(j) for j in range(1, n + 1) if j != i)],
                                    stdout=subprocess.PIPE, text=True)
                   for i, ns in enumerate(hosts, 1)]
        result = {}
        for ns, ping, p in zip(hosts, pingers, procs):
            unreached = ping.communicate(timeout=60)[0].split()
            with open(f"/proc/{p.pid}/status") as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            result[ns] = (unreached, rss, lab.stats(ns))
        return result
    finally:
        for p in procs:             # stop them all at once; lab.close waits for each
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)


def test_32_hosts_full_mesh(lab):
    result = fan_mesh(lab)
    rss = sorted(r for _, r, _ in result.values())
    print(f"{len(result)} forwarders, RSS kB: min {rss[0]}, median {rss[len(rss) // 2]}, "
          f"max {rss[-1]}")
    for ns, (unreached, kb, _) in result.items():
        print(f"  {ns}: RSS {kb} kB")
    assert len(result) == N_HOSTS
    assert {ns: u for ns, (u, _, _) in result.items() if u} == {}   # every pair answered
    for _, _, s in result.values():        # the echoes crossed the fan, out and back
        assert s["tx_packets"] >= N_HOSTS - 1 and s["rx_packets"] >= N_HOSTS - 1
