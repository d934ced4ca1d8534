"""Where an idle ping's time goes, hop by hop.

Two hosts on the lab's switch; h1 pings h2's overlay address (300 pings, 10 ms apart, as
bench/e2e.py does) through the kernel's VXLAN and through fanpkt (IPIP and VXLAN). In each
namespace a packet socket sees every device's traffic with the kernel's own timestamps
(SO_TIMESTAMPNS: taken as the packet passes the device, in whatever thread carries it). The
capturing process does not read during the pings, so it adds no wake-up of its own; it
drains its socket afterwards. Each ping is then a timeline (h1's TUN out, h1's eth0 out,
h2's eth0 in, ...), and the table gives each step's median over the pings: for fanpkt a
step from a device to the next one is a forwarding loop's wake-up, its system calls and the
kernel's work under them.

Beside it, the cost of one wake-up on this machine (bench/wake.c): two threads passing a
byte through pipes after 10 ms asleep, on one CPU and on two (what a thread asleep in
poll() pays when its packet arrives); and with --pin, the same pings with every forwarding
thread and the ping on CPU 0, where each wake-up is a switch on a running CPU; with
--busy-poll US,..., the same pings with the kernel's busy polling on (net.core.busy_poll and
busy_read, the system-wide defaults behind SO_BUSY_POLL, set to US µs, and the lab's veths
set to deliver through the NAPI context busy polling spins on; all put back afterwards).
Ratios to the kernel's ping are taken within each round.

    sudo python3 bench/ping_hops.py [--rounds 2] [--pin] [--busy-poll 50,300]
                                    [--out bench/results] [--name ping-hops]
Writes NAME.json and NAME.md.
"""
import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))     # the lab helpers
from lab import Lab, nsx  # noqa: E402

ETH_P_ALL = 0x0003
SO_TIMESTAMPNS = 35
SO_RCVBUFFORCE = 33
PINGS = 300
WARM = 20           # pings left out: the first ones resolve neighbours and warm caches
OUTGOING = 4        # sockaddr_ll pkttype of a packet the host sends


def capture(path: str) -> None:
    """In a namespace: queue every packet of every device until stdin closes, then write
    (device, outgoing, microseconds, first bytes) lines to path as JSON."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
    print("ready", flush=True)
    sys.stdin.read()                    # no recv() while the pings run: no wake-ups
    s.setblocking(False)
    out = []
    while True:
        try:
            data, anc, _, addr = s.recvmsg(192, 64)
        except BlockingIOError:
            break
        ts = next(struct.unpack("qq", d[:16]) for lvl, typ, d in anc if typ == SO_TIMESTAMPNS)
        dev = addr[0]             # (ifname, protocol, pkttype, ...)
        out.append((dev, addr[2] == OUTGOING, ts[0] * 1e6 + ts[1] / 1e3, data.hex()))
    with open(path, "w") as f:
        json.dump(out, f)


def icmp_of(data: bytes, overlay_octet: int):
    """(type, seq) of the ping inside data, whatever it is wrapped in, or None."""
    for off in range(0, min(len(data) - 28, 128)):
        if (data[off] == 0x45 and data[off + 9] == 1 and
                overlay_octet in (data[off + 12], data[off + 16])):
            icmp = data[off + 20:]
            if icmp[0] in (0, 8):
                return icmp[0], int.from_bytes(icmp[6:8], "big")
    return None


def timelines(records: dict, overlay_octet: int) -> list:
    """For each ping: its events [(t, 'h1 eth0 out'), ...] in time order."""
    per_seq: dict[int, list] = {}
    for host, recs in records.items():
        for dev, outgoing, t, hexdata in recs:
            found = icmp_of(bytes.fromhex(hexdata), overlay_octet)
            if found is None:
                continue
            kind, seq = found
            label = f"{host} {dev} {'out' if outgoing else 'in'}"
            if kind == 0:
                label += " (reply)"
            per_seq.setdefault(seq, []).append((t, label))
    return [sorted(ev) for seq, ev in sorted(per_seq.items()) if seq >= WARM]


def hop_table(lines: list) -> dict:
    """The step medians over the pings that took the commonest path."""
    shapes: dict[tuple, list] = {}
    for ev in lines:
        shapes.setdefault(tuple(label for _, label in ev), []).append(ev)
    shape, pings = max(shapes.items(), key=lambda kv: len(kv[1]))
    steps = []
    for i, label in enumerate(shape):
        if i == 0:
            continue
        d = [ev[i][0] - ev[i - 1][0] for ev in pings]
        steps.append({"to": label, "median_us": round(statistics.median(d), 1),
                      "p10_us": round(sorted(d)[len(d) // 10], 1)})
    total = [ev[-1][0] - ev[0][0] for ev in pings]
    return {"pings": len(pings), "of": len(lines), "first": shape[0], "steps": steps,
            "total_median_us": round(statistics.median(total), 1)}


def wake_cost(cpus: tuple, rounds: int = 300, idle_us: int = 10000) -> float:
    """Median microseconds for a byte to reach a thread asleep in poll() and come back,
    after idle_us asleep: two wake-ups (bench/wake.c). cpus: where the two threads run."""
    with tempfile.TemporaryDirectory() as work:
        exe = os.path.join(work, "wake")
        subprocess.run(["cc", "-O2", "-pthread", "-o", exe, os.path.join(HERE, "wake.c")],
                       check=True)
        out = subprocess.run([exe, str(cpus[0]), str(cpus[1]), str(idle_us), str(rounds)],
                             check=True, capture_output=True, text=True).stdout
    return float(out.split()[0])


def pin_all(pid: int, cpu: int) -> None:
    subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(pid)], check=True,
                   stdout=subprocess.DEVNULL)


def set_busy_knobs(values: dict) -> dict:
    """Set net.core's busy-polling sysctls; returns what they were."""
    old = {}
    for knob, value in values.items():
        path = f"/proc/sys/net/core/{knob}"
        with open(path) as f:
            old[knob] = int(f.read())
        with open(path, "w") as f:
            f.write(str(value))
    return old


def busy_poll(lab, hosts, us: int) -> None:
    """Busy polling at us µs, system-wide, with the lab's veths made to deliver through
    NAPI, which busy polling spins on (0: off, and a veth's defaults: GRO off, TSO on).
    A socket can busy-poll only if its packets came through a NAPI context (their
    napi_id, SO_INCOMING_NAPI_ID), and a veth uses its NAPI only with GRO on at the
    receiving end and, for a forwarded packet, TSO off at the sending one
    (veth_skb_is_eligible_for_gro); else it queues to the CPU's backlog, which has no id.
    Checked: a UDP socket in h2 sees napi_id 0 without the switch ports' TSO off, and a
    real id with it."""
    set_busy_knobs({"busy_poll": us, "busy_read": us})
    on, off = ("on", "off") if us else ("off", "on")
    for ns in hosts:
        nsx(ns, "ethtool", "-K", "eth0", "gro", on)
    for i in range(1, lab.ports + 1):
        nsx(lab.switch, "ethtool", "-K", f"p{i}", "gro", on, "tso", off)


def measure(h1, h2, dst, overlay_octet, pin) -> dict:
    caps = {}
    for host, ns in (("h1", h1), ("h2", h2)):
        path = f"/tmp/{ns}-hops.json"
        c = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, __file__,
                              "--capture", path], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        if c.stdout.readline().strip() != "ready":
            raise RuntimeError(f"capture in {ns} did not start")
        caps[host] = (c, path)
    try:
        pre = ["taskset", "-c", "0"] if pin else []
        out = nsx(h1, *pre, "ping", "-n", "-q", "-c", str(PINGS), "-i", "0.01", dst,
                  check=False, timeout=PINGS + 30).stdout
        rtt = float(out.rsplit("=", 1)[1].split("/")[1]) * 1000
    finally:
        for c, _ in caps.values():
            c.stdin.close()
            c.wait(60)
    records = {}
    for host, (_, path) in caps.items():
        with open(path) as f:
            records[host] = json.load(f)
        os.unlink(path)
    res = hop_table(timelines(records, overlay_octet))
    res["ping_avg_us"] = round(rtt, 1)
    return res


def run_mode(lab, h1, h2, mode, pin) -> dict:
    if mode == "vxlan":
        for ns, me, peer, ov in ((h1, "172.16.1.1", "172.16.2.1", "10.200.0.1"),
                                 (h2, "172.16.2.1", "172.16.1.1", "10.200.0.2")):
            nsx(ns, "ip", "link", "add", "vx0", "type", "vxlan", "id", "42", "dstport",
                "8472", "local", me, "remote", peer, "dev", "eth0")
            nsx(ns, "ip", "addr", "add", f"{ov}/24", "dev", "vx0")
            nsx(ns, "ip", "link", "set", "vx0", "up")
        try:
            nsx(h1, "ping", "-c", "3", "-i", "0.2", "10.200.0.2", check=False)
            return measure(h1, h2, "10.200.0.2", 10, pin)
        finally:
            for ns in (h1, h2):
                nsx(ns, "ip", "link", "del", "vx0")
    kind = {"fanpkt": "ipip", "fanpkt-vxlan": "vxlan"}[mode]
    # the userspace engine's hops are what this measures, on both fan types
    p1 = lab.forward(h1, "-o", "241.0.0.0/8", "-u", "172.16.1.1/16", "--type", kind,
                     "--datapath", "user")
    p2 = lab.forward(h2, "-o", "241.0.0.0/8", "-u", "172.16.2.1/16", "--type", kind,
                     "--datapath", "user")
    try:
        if pin:
            pin_all(p1.pid, 0)
            pin_all(p2.pid, 0)
        nsx(h1, "ping", "-c", "3", "-i", "0.2", "241.2.1.1", check=False)
        time.sleep(1)
        return measure(h1, h2, "241.2.1.1", 241, pin)
    finally:
        lab.stop(p1)
        lab.stop(p2)


def report(res: dict) -> str:
    lines = ["# Where an idle ping's time goes (bench/ping_hops.py)", "",
             f"{PINGS - WARM} pings per mode and round, 10 ms apart; each step is the median "
             "over the pings (and over rounds) of the time from one device's timestamp to "
             "the next. Medians of steps do not add up exactly to the median total.", "",
             "Wake-up cost on this machine (bench/wake.c: a byte to a thread asleep in "
             "poll() and back, after 10 ms asleep; two wake-ups):", ""]
    for k, v in res["wake"].items():
        lines.append(f"- {k}: {statistics.median(v)} µs (rounds: {v})")
    for variant, modes in res["modes"].items():
        lines += ["", f"## {variant}", ""]
        kernel = modes.get("vxlan")
        for mode, rounds in modes.items():
            if kernel is None or mode == "vxlan":
                continue
            # within each round, as every ratio in this project is taken
            rs = [r["ping_avg_us"] / k["ping_avg_us"] for r, k in zip(rounds, kernel)]
            lines.append(f"- {mode} / kernel VXLAN, ping: {statistics.median(rs):.2f}x "
                         f"(rounds {min(rs):.2f}-{max(rs):.2f})")
        lines.append("")
        for mode, rounds in modes.items():
            first = rounds[0]
            ping = statistics.median(r["ping_avg_us"] for r in rounds)
            total = statistics.median(r["total_median_us"] for r in rounds)
            lines += [f"### {mode}", "",
                      f"ping average {ping} µs; first timestamp to last {total} µs "
                      f"(rounds: {[r['ping_avg_us'] for r in rounds]} µs ping)", "",
                      f"| step (from {first['first']}) | median µs | p10 µs |", "|---|---|---|"]
            for i, step in enumerate(first["steps"]):
                same = [r["steps"][i] for r in rounds if len(r["steps"]) == len(first["steps"])]
                lines.append(f"| → {step['to']} | "
                             f"{statistics.median(x['median_us'] for x in same)} "
                             f"| {statistics.median(x['p10_us'] for x in same)} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pin", action="store_true",
                    help="also measure with the forwarders and the ping on CPU 0")
    ap.add_argument("--busy-poll", default="",
                    help="also measure with busy polling at these µs (comma-separated)")
    ap.add_argument("--modes", default="vxlan,fanpkt,fanpkt-vxlan")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--name", default="ping-hops")
    ap.add_argument("--capture", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.capture:
        capture(args.capture)
        return
    # (label, pinned, busy-poll µs)
    variants = [("free", False, 0)] + ([("pinned to CPU 0", True, 0)] if args.pin else [])
    variants += [(f"busy poll {us} µs", False, int(us))
                 for us in args.busy_poll.split(",") if us]
    res = {"wake": {}, "modes": {v[0]: {} for v in variants}}
    # what the machine had, put back at the end
    knobs = set_busy_knobs({"busy_poll": 0, "busy_read": 0}) if args.busy_poll else {}
    lab = Lab(f"fphops{os.getpid() % 1000}-")
    try:
        h1 = lab.host("h1", "172.16.1.1")
        h2 = lab.host("h2", "172.16.2.1")
        for r in range(args.rounds):
            for cpus in ((0, 0), (0, 1)):
                key = "one CPU" if cpus[0] == cpus[1] else "two CPUs"
                res["wake"].setdefault(key, []).append(wake_cost(cpus))
            for variant, pin, us in variants:
                if args.busy_poll:
                    busy_poll(lab, (h1, h2), us)
                for mode in args.modes.split(","):
                    got = run_mode(lab, h1, h2, mode, pin)
                    res["modes"][variant].setdefault(mode, []).append(got)
                    print(r, variant, mode, got["ping_avg_us"], "µs", flush=True)
    finally:
        if args.busy_poll:
            busy_poll(lab, (), 0)
            set_busy_knobs(knobs)
        lab.close()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
        f.write(report(res))
    print(report(res))


if __name__ == "__main__":
    main()
