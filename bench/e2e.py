"""End-to-end benchmark: the same two-host topology, measured in one run, for
  veth    the underlay itself (the ceiling)
  vxlan   the kernel's VXLAN overlay (the in-kernel reference)
  vxlan-bridged  the same laid out as the fan lays it out: a bridge holding the overlay
          address, the vxlan device (static remote) its port (the kernel path's reference)
  vxlan-flow  the same with a flow-based vxlan device (`external`) steered by a program
          that only sets the tunnel key (bench/flow_floor.bpf.c): the floor of any design
          on a flow-based device, fanpkt's kernel path included
  fanpkt-kernel  fanpkt-forward --type vxlan --datapath kernel: the kernel's own vxlan
          driver steered by fanpkt's eBPF programs (fanpkt/kernelpath.py)
  fanpkt     fanpkt-forward (underlay packets as frames to resolved neighbours, the default)
  fanpkt-ip  fanpkt-forward --underlay-send ip (every underlay packet through the raw socket)
  fanpkt-vxlan  fanpkt-forward --type vxlan --datapath user: the userspace engine (the fan
          LXD builds: frames in UDP via a TAP)
  fanpkt-1q, fanpkt-vxlan-1q  the same with --queues 1 (one transmit loop per fan, one
          receive loop), against the default of one queue per CPU
  python  bench/pyforward.py: the same job in plain Python on the tests' oracle
Metrics: single-stream TCP (iperf3, 5 s), 4-stream TCP (iperf3 -P 4), 64-byte UDP
delivered per second (iperf3, 3 s; with what the sender offered and where the rest was
lost, per second: the sending TUN/TAP's queue, the receiving application's socket), ping
RTT idle and under a saturating TCP stream, the forwarders' CPU while idle and during the
single-stream TCP test (% of one core, the busier of the two), and CPU time
per packet of the sending host's transmit threads and the receiving host's receive threads
(during the TCP test).

The machine is shared and its speed drifts, so the modes are measured in rounds, every
mode once per round, back to back. The table gives each metric's median over the rounds
and the TCP range; the ratios are taken within each round (same minute, same machine
state) and given as median and range. e2e.json keeps every round.

    sudo python3 bench/e2e.py [--rounds 5] [--seconds 5] [--out bench/results]
Writes e2e.json, e2e.md and e2e.png.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))     # the lab helpers
from lab import Lab, nsx  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int, loop: str) -> float:
    """CPU seconds of the threads of loop `loop` and its other queues (`loop.<queue>`) in
    process pid, found by the names the kernel gives them (engine.kernel_name)."""
    from fanpkt.config import MAX_QUEUES
    from fanpkt.engine import kernel_name
    names = {kernel_name(loop)} | {kernel_name(f"{loop}.{q}") for q in range(1, MAX_QUEUES)}
    total, found = 0.0, False
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            stat = f.read()
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        if comm in names:
            fields = stat[stat.rindex(")") + 2:].split()
            total += (int(fields[11]) + int(fields[12])) / TICK
            found = True
    if not found:
        raise LookupError(f"no thread of loop {loop} in {pid}")
    return total


def process_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def ping_avg(ns, dst, count=50) -> float:
    out = nsx(ns, "ping", "-n", "-q", "-c", str(count), "-i", "0.01", dst, check=False,
              timeout=count + 30).stdout
    return float(out.rsplit("=", 1)[1].split("/")[1])


def link_stats(ns: str, dev: str) -> dict:
    return json.loads(nsx(ns, "ip", "-s", "-j", "link", "show", dev).stdout)[0]["stats64"]


def udp_snmp(ns: str) -> dict:
    """The namespace's UDP counters (/proc/net/snmp): RcvbufErrors is a datagram the
    receiving application's socket had no room for."""
    rows = [line.split() for line in nsx(ns, "cat", "/proc/net/snmp").stdout.splitlines()
            if line.startswith("Udp:")]
    return dict(zip(rows[0][1:], map(int, rows[1][1:])))


def iperf(ns, dst, *args, seconds):
    out = nsx(ns, "iperf3", "-c", dst, "-J", "-t", str(seconds), *args, check=False,
              timeout=seconds + 60).stdout
    return json.loads(out)


def measure(lab, h1, h2, dst, seconds, threads=None, pids=()):
    res = {}
    server = subprocess.Popen(["ip", "netns", "exec", h2, "iperf3", "-s"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        if threads:
            (pid1, tx_name), (pid2, rx_name) = threads
            s1 = link_stats(h1, "fan-241")
            # Per packet means per underlay packet: with offloads one TUN read or write
            # carries many segments.
            u1, u2 = link_stats(h1, "eth0"), link_stats(h2, "eth0")
            c1, c2 = thread_cpu(pid1, tx_name), thread_cpu(pid2, rx_name)
        busy0 = [process_cpu(p) for p in pids]
        tcp = iperf(h1, dst, seconds=seconds)
        if pids:
            res["busy_cpu_pct"] = max((process_cpu(p) - b) / tcp["end"]["sum_received"]
                                      ["seconds"] * 100 for p, b in zip(pids, busy0))
        res["tcp_gbit"] = tcp["end"]["sum_received"]["bits_per_second"] / 1e9
        res["tcp_retransmits"] = tcp["end"]["sum_sent"].get("retransmits")
        if threads:
            e1 = link_stats(h1, "fan-241")
            v1, v2 = link_stats(h1, "eth0"), link_stats(h2, "eth0")
            tx_pk = v1["tx"]["packets"] - u1["tx"]["packets"]
            rx_pk = v2["rx"]["packets"] - u2["rx"]["packets"]
            res["tx_ns_per_packet"] = (thread_cpu(pid1, tx_name) - c1) / max(tx_pk, 1) * 1e9
            res["rx_ns_per_packet"] = (thread_cpu(pid2, rx_name) - c2) / max(rx_pk, 1) * 1e9
            res["tun_tx_dropped"] = e1["tx"]["dropped"] - s1["tx"]["dropped"]
        tcp4 = iperf(h1, dst, "-P", "4", seconds=seconds)
        res["tcp_p4_gbit"] = tcp4["end"]["sum_received"]["bits_per_second"] / 1e9
        # 64-byte UDP, and where what is offered but not delivered is lost: the sending
        # TUN/TAP's queue (fanpkt's transmit loop behind), or the receiving application's
        # socket (it gets too little CPU); fanpkt counts its own drops between the two.
        snmp0 = udp_snmp(h2)
        dev0 = link_stats(h1, "fan-241") if threads else None
        udp = iperf(h1, dst, "-u", "-l", "64", "-b", "0", seconds=max(2, seconds - 2))
        snmp1 = udp_snmp(h2)
        s = udp["end"]["sum"]
        res["udp64_delivered_pps"] = (s["packets"] - s["lost_packets"]) / s["seconds"]
        res["udp64_offered_pps"] = s["packets"] / s["seconds"]
        res["udp64_app_drops_pps"] = (snmp1["RcvbufErrors"] - snmp0["RcvbufErrors"]) \
            / s["seconds"]
        if threads:
            res["udp64_dev_drops_pps"] = (link_stats(h1, "fan-241")["tx"]["dropped"]
                                          - dev0["tx"]["dropped"]) / s["seconds"]
        res["ping_avg_ms"] = ping_avg(h1, dst)
        # under load: a saturating TCP stream the same way, pings between its packets
        load = subprocess.Popen(["ip", "netns", "exec", h1, "iperf3", "-c", dst, "-t",
                                 str(seconds + 2)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            time.sleep(1)                       # past slow start
            res["ping_load_ms"] = ping_avg(h1, dst, count=100)
        finally:
            load.wait(timeout=seconds + 60)
        if pids:    # idle: what the forwarders burn with nothing to do, % of one core
            time.sleep(1)
            before = [process_cpu(p) for p in pids]
            time.sleep(5)
            res["idle_cpu_pct"] = max((process_cpu(p) - b) / 5 * 100
                                      for p, b in zip(pids, before))
    finally:
        server.kill()
        server.wait()
    return res


def floor_object(local: str, remote: str) -> str:
    """bench/flow_floor.bpf.c built for one host (its address and its peer's)."""
    def host_order(a):
        return "0x%08x" % int.from_bytes(bytes(map(int, a.split("."))), "big")
    out = f"/tmp/fanpkt-flow-floor-{local}.o"
    arch = subprocess.run(["gcc", "-print-multiarch"], capture_output=True,
                          text=True).stdout.strip()     # <asm/types.h>, as setup.py says
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", f"-I/usr/include/{arch}",
                    f"-DLOCAL={host_order(local)}",
                    f"-DREMOTE={host_order(remote)}", "-c",
                    os.path.join(HERE, "flow_floor.bpf.c"), "-o", out], check=True)
    return out


def kernel_vxlan(ns, mode, me, peer, ov):
    """The kernel's own vxlan in ns as mode has it: vx0 with a static remote, alone
    (vxlan) or the port of a bridge holding the overlay address (vxlan-bridged); or
    flow-based (`external`) on that bridge, steered by the floor program (vxlan-flow)."""
    if mode == "vxlan-flow":
        nsx(ns, "ip", "link", "add", "vx0", "type", "vxlan", "external", "dstport", "8472")
    else:
        nsx(ns, "ip", "link", "add", "vx0", "type", "vxlan", "id", "42", "dstport", "8472",
            "local", me, "remote", peer, "dev", "eth0")
    dev = "vx0"
    if mode != "vxlan":
        nsx(ns, "ip", "link", "add", "br0", "type", "bridge")
        nsx(ns, "ip", "link", "set", "vx0", "master", "br0", "mtu", "1450", "up")
        nsx(ns, "ip", "link", "set", "br0", "mtu", "1450")
        dev = "br0"
    if mode == "vxlan-flow":
        nsx(ns, "tc", "qdisc", "add", "dev", "vx0", "clsact")
        nsx(ns, "tc", "filter", "add", "dev", "vx0", "egress", "bpf", "da", "obj",
            floor_object(me, peer), "sec", "tc")
    nsx(ns, "ip", "addr", "add", f"{ov}/24", "dev", dev)
    nsx(ns, "ip", "link", "set", dev, "up")


def run_mode(lab, h1, h2, mode, seconds):
    if mode == "veth":
        return measure(lab, h1, h2, "172.16.2.1", seconds)
    if mode in ("vxlan", "vxlan-bridged", "vxlan-flow"):
        for ns, me, peer, ov in ((h1, "172.16.1.1", "172.16.2.1", "10.200.0.1"),
                                 (h2, "172.16.2.1", "172.16.1.1", "10.200.0.2")):
            kernel_vxlan(ns, mode, me, peer, ov)
        try:
            return measure(lab, h1, h2, "10.200.0.2", seconds)
        finally:
            for ns in (h1, h2):
                nsx(ns, "ip", "link", "del", "vx0", check=False)
                nsx(ns, "ip", "link", "del", "br0", check=False)
    if mode == "fanpkt-kernel":
        p1 = lab.forward(h1, "-o", "241.0.0.0/8", "-u", "172.16.1.1/16", "--type", "vxlan",
                         "--datapath", "kernel")
        p2 = lab.forward(h2, "-o", "241.0.0.0/8", "-u", "172.16.2.1/16", "--type", "vxlan",
                         "--datapath", "kernel")
        try:
            nsx(h1, "ping", "-c", "3", "-i", "0.2", "241.2.1.1", check=False)
            return measure(lab, h1, h2, "241.2.1.1", seconds, pids=(p1.pid, p2.pid))
        finally:
            lab.stop(p1)
            lab.stop(p2)
    if mode in ("fanpkt", "fanpkt-ip", "fanpkt-vxlan", "fanpkt-1q", "fanpkt-vxlan-1q"):
        extra = {"fanpkt": (), "fanpkt-ip": ("--underlay-send", "ip"),
                 "fanpkt-vxlan": ("--type", "vxlan", "--datapath", "user"),
                 "fanpkt-1q": ("--queues", "1"),
                 "fanpkt-vxlan-1q": ("--type", "vxlan", "--datapath", "user", "--queues", "1")
                 }[mode]
        rx_loop = "rx-vxlan-8472" if "vxlan" in mode else "rx"
        p1 = lab.forward(h1, "-o", "241.0.0.0/8", "-u", "172.16.1.1/16", *extra)
        p2 = lab.forward(h2, "-o", "241.0.0.0/8", "-u", "172.16.2.1/16", *extra)
        try:
            # Steady state, as on a host that has talked to its peers before: the first
            # packets make the kernel resolve the peer, and within a second the forwarder's
            # neighbour table has it. Same warm-up in both fanpkt modes.
            nsx(h1, "ping", "-c", "3", "-i", "0.2", "241.2.1.1", check=False)
            time.sleep(1.5)
            before = lab.stats(h1)
            res = measure(lab, h1, h2, "241.2.1.1", seconds,
                          ((p1.pid, "tx-241"), (p2.pid, rx_loop)),
                          pids=(p1.pid, p2.pid))
            after = lab.stats(h1)
            sent = after["tx_packets"] - before["tx_packets"]
            res["tx_frames_share"] = (after["tx_l2"] - before["tx_l2"]) / max(sent, 1)
            return res
        finally:
            lab.stop(p1)
            lab.stop(p2)
    if mode == "python":
        procs = []
        for ns, addr in ((h1, "172.16.1.1/16"), (h2, "172.16.2.1/16")):
            p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable,
                                  os.path.join(HERE, "pyforward.py"), "241.0.0.0/8", addr],
                                 stdout=subprocess.PIPE, text=True)
            assert p.stdout.readline().strip() == "ready"
            procs.append(p)
        try:
            return measure(lab, h1, h2, "241.2.1.1", seconds,
                           ((procs[0].pid, "pyfwd-tx"), (procs[1].pid, "pyfwd-rx")))
        finally:
            for p in procs:
                lab.stop(p)
    raise ValueError(mode)


def summarise(rounds: list[dict]) -> dict:
    """Per mode, each metric's median over the rounds, and the TCP range."""
    modes = {}
    for mode in rounds[0]:
        runs = [r[mode] for r in rounds]
        med = {}
        for key in runs[0]:
            vals = [x[key] for x in runs if x.get(key) is not None]
            med[key] = statistics.median(vals) if vals else None
        tcp = [x["tcp_gbit"] for x in runs]
        med["tcp_gbit_min"], med["tcp_gbit_max"] = min(tcp), max(tcp)
        modes[mode] = med
    return modes


def ratios(rounds: list[dict]) -> list[str]:
    """fanpkt's rates over each reference's, taken within each round."""
    out = []
    for mine, ref, key in (("fanpkt", "python", "tcp_gbit"), ("fanpkt", "vxlan", "tcp_gbit"),
                           ("fanpkt-vxlan", "vxlan", "tcp_gbit"),
                           ("fanpkt-vxlan", "fanpkt", "tcp_gbit"),
                           ("fanpkt", "vxlan", "udp64_delivered_pps"),
                           ("fanpkt-vxlan", "vxlan", "udp64_delivered_pps"),
                           ("fanpkt", "vxlan", "ping_avg_ms"),
                           ("fanpkt-vxlan", "vxlan", "ping_avg_ms"),
                           ("fanpkt", "vxlan", "ping_load_ms"),
                           ("fanpkt-vxlan", "vxlan", "ping_load_ms"),
                           ("fanpkt", "fanpkt-1q", "tcp_p4_gbit"),
                           ("fanpkt-vxlan", "fanpkt-vxlan-1q", "tcp_p4_gbit"),
                           ("fanpkt-kernel", "vxlan-bridged", "tcp_gbit"),
                           ("fanpkt-kernel", "vxlan-bridged", "tcp_p4_gbit"),
                           ("fanpkt-kernel", "vxlan-bridged", "udp64_delivered_pps"),
                           ("fanpkt-kernel", "vxlan-bridged", "ping_avg_ms"),
                           ("fanpkt-kernel", "vxlan-bridged", "ping_load_ms"),
                           ("vxlan-flow", "vxlan-bridged", "tcp_gbit"),
                           ("vxlan-flow", "vxlan-bridged", "tcp_p4_gbit"),
                           ("vxlan-flow", "vxlan-bridged", "udp64_delivered_pps"),
                           ("vxlan-flow", "vxlan-bridged", "ping_avg_ms"),
                           ("fanpkt-kernel", "vxlan-flow", "tcp_gbit"),
                           ("fanpkt-kernel", "vxlan-flow", "tcp_p4_gbit"),
                           ("fanpkt-kernel", "vxlan-flow", "udp64_delivered_pps"),
                           ("fanpkt-kernel", "vxlan", "tcp_gbit"),
                           ("fanpkt-kernel", "fanpkt-vxlan", "tcp_gbit"),
                           ("fanpkt-kernel", "fanpkt-vxlan", "ping_avg_ms")):
        if mine not in rounds[0] or ref not in rounds[0]:
            continue
        rs = [r[mine][key] / r[ref][key] for r in rounds]
        out.append(f"{mine} / {ref} {key}: {statistics.median(rs):.2f}x "
                   f"(rounds {min(rs):.2f}-{max(rs):.2f})")
    return out


def write_outputs(results, out):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "e2e.json"), "w") as f:
        json.dump(results, f, indent=1)
    n = len(results["rounds"])
    cols = [("tcp_gbit", "TCP Gbit/s", "{:.2f}"), ("tcp_p4_gbit", "TCP -P 4", "{:.2f}"),
            ("udp64_delivered_pps", "UDP 64 B pkt/s", "{:,.0f}"),
            ("udp64_offered_pps", "UDP offered", "{:,.0f}"),
            ("udp64_dev_drops_pps", "UDP lost at TUN/TAP", "{:,.0f}"),
            ("udp64_app_drops_pps", "UDP lost at app socket", "{:,.0f}"),
            ("ping_avg_ms", "ping ms", "{:.3f}"), ("ping_load_ms", "ping loaded ms", "{:.3f}"),
            ("idle_cpu_pct", "idle CPU %", "{:.2f}"),
            ("busy_cpu_pct", "CPU % in TCP", "{:.1f}"),
            ("tx_ns_per_packet", "tx CPU ns/pkt", "{:.0f}"),
            ("rx_ns_per_packet", "rx CPU ns/pkt", "{:.0f}"),
            ("tun_tx_dropped", "TUN tx drops", "{:.0f}"),
            ("tx_frames_share", "sent as frames", "{:.0%}")]
    lines = [f"Median of {n} round(s); TCP range over the rounds in brackets.", "",
             "| mode | " + " | ".join(c[1] for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    m = results["modes"]
    for mode, r in m.items():
        cells = [c[2].format(r[c[0]]) if r.get(c[0]) is not None else "–" for c in cols]
        cells[0] += f" ({r['tcp_gbit_min']:.2f}–{r['tcp_gbit_max']:.2f})"
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    if "tun_tx_dropped" in m.get("fanpkt", {}):
        lines += ["", "TUN tx drops (fanpkt), every round: " + ", ".join(
            str(r["fanpkt"]["tun_tx_dropped"]) for r in results["rounds"])]
    lines += [""] + ratios(results["rounds"])
    md = "\n".join(lines) + "\n"
    with open(os.path.join(out, "e2e.md"), "w") as f:
        f.write(md)
    print(md)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = list(m)
    axes[0].bar(names, [m[n]["tcp_gbit"] for n in names], color="tab:blue")
    axes[0].set_title("single-stream TCP (Gbit/s)")
    axes[1].bar(names, [m[n]["udp64_delivered_pps"] / 1e3 for n in names], color="tab:green")
    axes[1].set_title("64-byte UDP delivered (kpkt/s)")
    fig.suptitle(f"fanpkt end to end, {results['when']}")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "e2e.png"), dpi=90)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--modes", default="veth,vxlan,vxlan-bridged,vxlan-flow,fanpkt,fanpkt-1q,"
                                       "fanpkt-ip,fanpkt-vxlan,fanpkt-vxlan-1q,fanpkt-kernel,"
                                       "python")
    args = ap.parse_args()
    lab = Lab(f"fpbench{os.getpid() % 10000}-")
    results = {"when": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
               "rounds": []}
    try:
        h1 = lab.host("h1", "172.16.1.1")
        h2 = lab.host("h2", "172.16.2.1")
        for k in range(args.rounds):
            this = {}
            for mode in args.modes.split(","):
                print(f"round {k + 1}/{args.rounds}: {mode} ...", flush=True)
                this[mode] = run_mode(lab, h1, h2, mode, args.seconds)
                print(f"  {this[mode]}", flush=True)
            results["rounds"].append(this)
    finally:
        lab.close()
    if not results["rounds"]:
        sys.exit("no round completed")
    results["modes"] = summarise(results["rounds"])
    write_outputs(results, args.out)


if __name__ == "__main__":
    main()
