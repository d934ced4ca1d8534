"""Ping under many-flow TCP load: where a ping's time goes when the fan is saturated.

Same two-host topology as e2e.py. Per round, for the kernel's VXLAN and each fanpkt type:
`iperf3 -P FLOWS` for 8 s, and 300 pings at 10 ms intervals from its second 1.5 on; the
ping average and maximum and the aggregate rate. Each fanpkt type also runs with its
forwarders' threads reniced (`--nice`, e.g. -10): if that cuts the ping time, the ping was
waiting for a CPU, not in a queue of packets (docs/performance.md §4).

    sudo python3 bench/loaded_ping.py [--rounds 2] [--flows 1,8] [--types vxlan,ipip]
                                      [--nice -10] [--out bench/results]
Writes loaded_ping.json and loaded_ping.md.
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

SECONDS = 8


def ping(ns, dst, count=300):
    out = nsx(ns, "ping", "-n", "-q", "-c", str(count), "-i", "0.01", dst, check=False,
              timeout=count + 60).stdout
    _, avg, mx, _ = map(float, out.rsplit("=", 1)[1].split()[0].split("/"))
    return avg, mx


def loaded(h1, h2, dst, flows):
    server = subprocess.Popen(["ip", "netns", "exec", h2, "iperf3", "-s"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        load = subprocess.Popen(["ip", "netns", "exec", h1, "iperf3", "-c", dst, "-t",
                                 str(SECONDS), "-P", str(flows), "-J"],
                                stdout=subprocess.PIPE, text=True)
        time.sleep(1.5)                         # past slow start
        avg, mx = ping(h1, dst)
        out = json.loads(load.communicate(timeout=SECONDS + 60)[0])
    finally:
        server.kill()
        server.wait()
    return {"ping_avg_ms": avg, "ping_max_ms": mx,
            "gbit": out["end"]["sum_received"]["bits_per_second"] / 1e9}


def renice(pid, nice):
    for tid in os.listdir(f"/proc/{pid}/task"):
        subprocess.run(["renice", "-n", str(nice), "-p", tid], stdout=subprocess.DEVNULL,
                       check=True)


def kernel_vxlan(h1, h2, up):
    for ns, me, peer, ov in ((h1, "172.16.1.1", "172.16.2.1", "10.200.0.1"),
                             (h2, "172.16.2.1", "172.16.1.1", "10.200.0.2")):
        if up:
            nsx(ns, "ip", "link", "add", "vx0", "type", "vxlan", "id", "42", "dstport",
                "8472", "local", me, "remote", peer, "dev", "eth0")
            nsx(ns, "ip", "addr", "add", f"{ov}/24", "dev", "vx0")
            nsx(ns, "ip", "link", "set", "vx0", "up")
        else:
            nsx(ns, "ip", "link", "del", "vx0", check=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--flows", default="1,8")
    ap.add_argument("--types", default="vxlan,ipip")
    ap.add_argument("--nice", type=int, default=-10)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    flows = [int(f) for f in args.flows.split(",")]
    lab = Lab(f"fplp{os.getpid() % 10000}-")
    rows = []       # (round, mode, flows, result)
    try:
        h1, h2 = lab.host("h1", "172.16.1.1"), lab.host("h2", "172.16.2.1")
        for k in range(args.rounds):
            kernel_vxlan(h1, h2, True)
            try:
                for n in flows:
                    rows.append((k, "vxlan (kernel)", n, loaded(h1, h2, "10.200.0.2", n)))
                    print(rows[-1], flush=True)
            finally:
                kernel_vxlan(h1, h2, False)
            for typ in args.types.split(","):
                for nice in (0, args.nice):
                    extra = ("--type", "vxlan", "--datapath", "user") if typ == "vxlan" else ()
                    p1 = lab.forward(h1, "-o", "241.0.0.0/8", "-u", "172.16.1.1/16", *extra)
                    p2 = lab.forward(h2, "-o", "241.0.0.0/8", "-u", "172.16.2.1/16", *extra)
                    try:
                        if nice:
                            renice(p1.pid, nice)
                            renice(p2.pid, nice)
                        nsx(h1, "ping", "-c", "3", "-i", "0.2", "241.2.1.1", check=False)
                        time.sleep(1.5)             # the peer resolved, as in e2e.py
                        mode = f"fanpkt {typ}" + (f", nice {nice}" if nice else "")
                        for n in flows:
                            rows.append((k, mode, n, loaded(h1, h2, "241.2.1.1", n)))
                            print(rows[-1], flush=True)
                    finally:
                        lab.stop(p1)
                        lab.stop(p2)
    finally:
        lab.close()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "loaded_ping.json"), "w") as f:
        json.dump({"when": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, f, indent=1)
    lines = [f"Median of {args.rounds} round(s); iperf3 -P FLOWS for {SECONDS} s, 300 pings "
             "at 10 ms from 1.5 s on.", "",
             "| mode | flows | ping avg ms | ping max ms | TCP Gbit/s |", "|---|---|---|---|---|"]
    for mode in dict.fromkeys(r[1] for r in rows):
        for n in flows:
            got = [r[3] for r in rows if r[1] == mode and r[2] == n]
            med = {key: statistics.median(g[key] for g in got) for key in got[0]}
            lines.append(f"| {mode} | {n} | {med['ping_avg_ms']:.3f} | "
                         f"{med['ping_max_ms']:.3f} | {med['gbit']:.2f} |")
    with open(os.path.join(args.out, "loaded_ping.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
