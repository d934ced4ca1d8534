"""Soak benchmark: two fanpkt hosts under steady traffic and constant churn, watched for
leaks, unbalanced counters and loss.

Each host runs one forwarder (`-c FILE`) with three fans:
  ipip   10.0.0.0/8, IPIP        unchanged all run
  vxlan  241.0.0.0/8, VXLAN      unchanged all run (datapath user: the soak is the engine's)
  churn  100.64.0.0/10, IPIP     the changed fan: every reload toggles its host-reserve
                                 (1 <-> 2), so each reload takes it down and up again
Traffic: sequence-numbered UDP both ways on every fan (RATE datagrams/s per direction per
fan, 200 bytes), from an endpoint in each host to the other host's gateway on that fan.
Churn, one event a second in turn:
  reload         rewrite both config files (churn toggled) and SIGHUP both forwarders
  neighbour flap `ip neigh flush` of the resolved underlay neighbours (eth0) on one host,
                 of the VXLAN bridge's resolved overlay neighbours on the other (ARP
                 across the fan again)
  link flap      down/up of a second underlay NIC (eth1, carrying no fan traffic: its
                 addresses and routes come and go) on one host, and of the churn fan's
                 TUN on the other (fan-side: its packets are lost while it is down)
Reported (JSON and markdown) and, with --check, asserted:
  - RSS and fd count of each forwarder, sampled every second: flat after warm-up (the
    first WARMUP_SHARE of the run, at least WARMUP_MIN s). Flat means: the second half's
    highest RSS is at most RSS_TOLERANCE_KB above the first half's, and the second half's
    highest fd count is no higher than the first half's.
  - counters that balance, per fan: every packet the forwarder read from the fan's TUN or
    TAP (the device's kernel tx_packets) is sent (tx_packets) or dropped by a named reason
    (drop_tx_*), summed over the fan's transmit loops (one per device queue). This needs
    one outer packet per read: the traffic is small UDP, so no TSO split or fragments
    (checked to be 0); a run of frames in one UDP GSO send is still a packet per frame.
  - zero loss on the unchanged fans: every datagram sent on ipip and vxlan arrives.

    sudo python3 bench/soak.py --minutes N [--check] [--rate 500] [--out bench/results]
writes soak.json and soak.md to --out.
"""
import argparse
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))     # the lab helpers
sys.path.insert(0, os.path.join(HERE, ".."))
from lab import FANPKT, Lab, nsx, poll, sh  # noqa: E402

FANS = {"ipip": ("10.0.0.0/8", ""), "vxlan": ("241.0.0.0/8", " type vxlan datapath user"),
        "churn": ("100.64.0.0/10", "")}
UNCHANGED = ("ipip", "vxlan")
PORT = 7700
SIZE = 200
WARMUP_SHARE, WARMUP_MIN = 0.2, 20.0
# Python's allocator takes memory from the system in 1 MiB arenas (3.10+) and glibc's
# malloc keeps freed blocks of a finished thread's arena for reuse: one more of either
# is not a leak. Two is the tolerance; a leak of one reload's loop arena (4 MiB) or of a
# few KiB per reload over hundreds of reloads exceeds it.
RSS_TOLERANCE_KB = 2048
SO_RCVBUFFORCE, SO_RXQ_OVFL = 33, 40
NUD_RESOLVED = ("nud", "reachable", "nud", "stale", "nud", "delay", "nud", "probe")


# -- the traffic endpoint, run in each host's namespace -----------------------------------
def endpoint(targets: str, rate: str) -> None:
    """Send "<stream> <seq>" datagrams to every target (name=addr,...) at rate per second
    each, and count what arrives on PORT by stream, from 'go' on stdin on. 'stop' on
    stdin: stop sending, print
    the sent counts, wait for stragglers, print the received counts (distinct sequence
    numbers) and exit."""
    rate = float(rate)
    streams = [t.split("=") for t in targets.split(",")]
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # FORCE: plain SO_RCVBUF is capped at net.core.rmem_max (208 KiB by default), 0.2 s of
    # this traffic, and a Python thread on a busy machine can be late by that much. The
    # socket's own drops are counted (SO_RXQ_OVFL) and reported, apart from the fans'.
    rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    rx.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
    rx.bind(("0.0.0.0", PORT))
    rx.settimeout(0.2)
    got: dict = {}
    overflow = [0]
    stop = threading.Event()

    def receive():
        while not (stop.is_set() and time.monotonic() > stop_at[0]):
            try:
                data, anc, _, _ = rx.recvmsg(2048, socket.CMSG_SPACE(4))
            except socket.timeout:
                continue
            for level, kind, value in anc:
                if (level, kind) == (socket.SOL_SOCKET, SO_RXQ_OVFL) and len(value) >= 4:
                    overflow[0] = struct.unpack("I", value[:4])[0]
            name, seq = data.split(b" ", 2)[:2]
            got.setdefault(name.decode(), set()).add(int(seq))

    stop_at = [float("inf")]
    t = threading.Thread(target=receive, daemon=True)
    t.start()
    sent = {name: 0 for name, _ in streams}
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pad = b"." * SIZE
    print("listening", flush=True)
    sys.stdin.readline()            # 'go': every endpoint listens by now
    stdin = threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True)
    stdin.start()
    start = time.monotonic()
    k = 0
    while not stop.is_set():
        k += 1
        for name, addr in streams:
            try:
                tx.sendto(f"{name} {sent[name]} ".encode() + pad, (addr, PORT))
                sent[name] += 1
            except OSError:     # the churn fan down: unreachable. Not sent, not counted.
                pass
        delay = start + k / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    print(json.dumps({"sent": sent}), flush=True)
    stop_at[0] = time.monotonic() + 2.0
    t.join()
    print(json.dumps({"received": {n: len(s) for n, s in got.items()},
                      "endpoint_socket_drops": overflow[0]}), flush=True)


# -- the controller ----------------------------------------------------------------------
def gateway(overlay: str, host: str) -> str:
    from fanpkt.fanmap import FanMap, ip
    return ip(FanMap.parse(overlay, f"{host}/16").gateway)


def config(host: str, reserve: int) -> str:
    return "".join(f"{ov} {host}/16{flags}" + (f" host-reserve {reserve}" if name == "churn"
                                               else "") + "\n"
                   for name, (ov, flags) in FANS.items())


def proc_sample(pid: int) -> tuple:
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def device_tx(ns: str, dev: str) -> int:
    out = json.loads(nsx(ns, "ip", "-s", "-j", "link", "show", dev).stdout)[0]
    return out["stats64"]["tx"]["packets"]


def balance(ns: str) -> dict:
    """Per fan: packets read from its device against what its transmit loop counted."""
    snap = json.loads(nsx(ns, *FANPKT, "stats", "--json").stdout)
    out = {}
    for name, (overlay, _) in FANS.items():
        dev = "fan-" + {"ipip": "10", "vxlan": "241", "churn": "100-64"}[name]
        loops = [v for k, v in snap["loops"].items()
                 if k == f"tx:{dev}" or k.startswith(f"tx:{dev}:")]     # one per queue
        c = {k: sum(v.get(k, 0) for v in loops) for k in loops[0]}
        read = device_tx(ns, dev)
        drops = {k: v for k, v in c.items() if k.startswith("drop_tx_") and v}
        accounted = c["tx_packets"] + sum(drops.values())
        # reads that made more than one packet would break read == accounted: a TSO
        # superpacket (however it left) or outer fragments. Not tx_gso: it also counts
        # runs of plain frames, each of which is one packet (docs/internals.md §3, Runs).
        multi = {k: c[k] for k in ("tx_tso_split", "tx_fragmented")}
        dev_stats = json.loads(nsx(ns, "ip", "-s", "-j", "link", "show", dev).stdout)[0]
        out[name] = {"device_tx_dropped": dev_stats["stats64"]["tx"]["dropped"],
                     "read": read, "tx_packets": c["tx_packets"],
                     "drops": drops, "accounted": accounted, "multi_output_reads": multi,
                     "balanced": read == accounted and not any(multi.values())}
    # what the receive loops dropped, for a loss to be traced (not part of the balance)
    out["rx_drops"] = {loop: {k: v for k, v in c.items() if k.startswith("drop_rx_") and v}
                       for loop, c in snap["loops"].items() if loop.startswith("rx")}
    return out


def flat(samples: list, start: float) -> dict:
    """RSS and fds after warm-up: the second half's highest against the first half's."""
    after = [s for s in samples if s[0] >= start]
    half = len(after) // 2
    first, second = after[:half], after[half:]
    if not first or not second:
        return {"ok": False, "why": "too few samples after warm-up"}
    rss1, rss2 = max(s[1] for s in first), max(s[1] for s in second)
    # fds: the median, not the highest. A reload and each neighbour refresh hold a
    # pyroute2 socket for a moment (4 fds: netlink, epoll and a pipe pair), so the highest
    # sample says whether a 1 Hz sample happened to land inside one; a leak raises the
    # count the forwarder sits at, which the median is.
    fd1, fd2 = statistics.median(s[2] for s in first), statistics.median(s[2] for s in second)
    return {"rss_first_half_max_kb": rss1, "rss_second_half_max_kb": rss2,
            "rss_growth_kb": rss2 - rss1, "fds_first_half_median": fd1,
            "fds_second_half_median": fd2, "fds_max": max(s[2] for s in after),
            "rss_min_kb": min(s[1] for s in after),
            "ok": rss2 - rss1 <= RSS_TOLERANCE_KB and fd2 <= fd1}


def soak(lab: Lab, minutes: float, rate: float, log) -> dict:
    hosts = {}
    for i in (1, 2):
        addr = f"172.16.{i}.1"
        ns = lab.host(f"h{i}", addr)
        # a second underlay NIC to flap, on the switch too; no fan uses it
        port = f"q{i}"
        sh("ip", "link", "add", "eth1", "netns", ns, "type", "veth", "peer", "name", port,
           "netns", lab.switch)
        nsx(lab.switch, "ip", "link", "set", port, "master", "br0", "up")
        nsx(ns, "ip", "addr", "add", f"172.17.{i}.1/16", "dev", "eth1")
        nsx(ns, "ip", "link", "set", "eth1", "up")
        conf = f"/tmp/{ns}-fan.conf"
        with open(conf, "w") as f:
            f.write(config(addr, 1))
        hosts[ns] = {"addr": addr, "conf": conf}
    for ns, h in hosts.items():
        h["proc"] = lab.forward(ns, "-c", h["conf"])
    (n1, h1), (n2, h2) = hosts.items()
    for ns, me, peer in ((n1, h1, h2), (n2, h2, h1)):
        for name, (ov, _) in FANS.items():
            poll(lambda: nsx(ns, "ping", "-c", "1", "-W", "1", gateway(ov, peer["addr"]),
                             check=False).returncode == 0, f"{ns} cannot reach {name}", 20)
    endpoints = {}
    for ns, me, peer in ((n1, h1, h2), (n2, h2, h1)):
        targets = ",".join(f"{ns[-2:]}-{name}={gateway(ov, peer['addr'])}"
                           for name, (ov, _) in FANS.items())
        p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, __file__,
                              "endpoint", targets, str(rate)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "listening"
        endpoints[ns] = p
    for p in endpoints.values():
        p.stdin.write("go\n")
        p.stdin.flush()
    samples = {ns: [] for ns in hosts}
    events = {"reloads": 0, "neighbour_flaps": 0, "link_flaps": 0}
    reserve, start = 1, time.monotonic()
    end = start + minutes * 60
    tick = 0
    try:
        while time.monotonic() < end:
            tick += 1
            now = time.monotonic() - start
            for ns, h in hosts.items():
                samples[ns].append((round(now, 1), *proc_sample(h["proc"].pid)))
            which = (n1, n2)[(tick // 3) % 2]
            other = n2 if which == n1 else n1
            if tick % 3 == 0:
                reserve = 3 - reserve
                for ns, h in hosts.items():
                    with open(h["conf"], "w") as f:
                        f.write(config(h["addr"], reserve))
                    h["proc"].send_signal(signal.SIGHUP)
                events["reloads"] += 1
            elif tick % 3 == 1:
                # resolved entries only: deleting an INCOMPLETE one drops the packets the
                # kernel queued on it (the host's loss, not the forwarder's)
                for ns, dev in ((which, "eth0"), (other, "fanbr-241")):
                    nsx(ns, "ip", "neigh", "flush", "dev", dev, *NUD_RESOLVED, check=False)
                events["neighbour_flaps"] += 1
            else:
                for ns, dev in ((which, "eth1"), (other, "fan-100-64")):
                    nsx(ns, "ip", "link", "set", dev, "down", check=False)
                    nsx(ns, "ip", "link", "set", dev, "up", check=False)
                events["link_flaps"] += 1
            if tick % 30 == 0:
                s = samples[n1][-1]
                log(f"{now:5.0f} s: {events['reloads']} reloads; {n1} RSS {s[1]} kB, "
                    f"{s[2]} fds")
            time.sleep(max(0.0, start + tick - time.monotonic()))
        # quiesce: stop the traffic, then let the last packets drain
        results = {}
        for ns, p in endpoints.items():
            p.stdin.write("stop\n")
            p.stdin.flush()
        for ns, p in endpoints.items():
            results[ns] = {}
            for line in p.communicate(timeout=30)[0].splitlines():
                results[ns].update(json.loads(line))
    finally:
        for p in endpoints.values():
            if p.poll() is None:
                p.kill()
    for h in hosts.values():
        assert h["proc"].poll() is None, "a forwarder died during the soak"
    time.sleep(1.0)     # the loops' last batches and counters (POLL_MS is 0.2 s)
    sent = {k: v for r in results.values() for k, v in r["sent"].items()}
    received = {k: v for r in results.values() for k, v in r["received"].items()}
    loss = {k: {"sent": v, "received": received.get(k, 0), "lost": v - received.get(k, 0)}
            for k, v in sorted(sent.items())}
    warm = max(WARMUP_MIN, WARMUP_SHARE * minutes * 60)
    report = {
        "minutes": minutes, "rate_per_stream": rate, "events": events,
        "warmup_s": warm, "rss_tolerance_kb": RSS_TOLERANCE_KB,
        "memory": {ns: flat(samples[ns], warm) for ns in hosts},
        "balance": {ns: balance(ns) for ns in hosts},
        "loss": loss, "samples": samples,
        # datagrams the measuring endpoints' own sockets dropped (not the fans'): a loss
        # they explain is the instrument's
        "endpoint_socket_drops": {ns: r.get("endpoint_socket_drops") for ns, r in
                                  results.items()},
    }
    report["checks"] = {
        "rss_and_fds_flat": all(m["ok"] for m in report["memory"].values()),
        "counters_balance": all(b[fan]["balanced"] for b in report["balance"].values()
                                for fan in FANS),
        "no_loss_on_unchanged_fans": all(v["lost"] == 0 and v["sent"] > 0
                                         for k, v in loss.items()
                                         if k.split("-", 1)[1] in UNCHANGED),
        "churn_happened": min(events.values()) >= 2,
    }
    return report


def markdown(r: dict) -> str:
    lines = [f"# Soak: {r['minutes']} minutes",
             "",
             f"Two hosts, three fans each (ipip, vxlan unchanged; churn reloaded), "
             f"{r['rate_per_stream']:.0f} UDP datagrams/s per direction per fan. "
             f"Events: {r['events']['reloads']} SIGHUP reloads, "
             f"{r['events']['neighbour_flaps']} neighbour flaps, "
             f"{r['events']['link_flaps']} link flaps. Warm-up {r['warmup_s']:.0f} s.",
             "", "| check | result |", "|---|---|"]
    lines += [f"| {k} | {'ok' if v else 'FAILED'} |" for k, v in r["checks"].items()]
    lines += ["", "| forwarder | RSS min kB | RSS max 1st half | RSS max 2nd half | growth kB "
              f"(tolerance {r['rss_tolerance_kb']}) | fds median 1st / 2nd half (highest) |",
              "|---|---|---|---|---|---|"]
    for ns, m in r["memory"].items():
        lines.append(f"| {ns} | {m.get('rss_min_kb')} | {m.get('rss_first_half_max_kb')} | "
                     f"{m.get('rss_second_half_max_kb')} | {m.get('rss_growth_kb')} | "
                     f"{m.get('fds_first_half_median')} / {m.get('fds_second_half_median')} "
                     f"({m.get('fds_max')}) |")
    lines += ["", "| forwarder | fan | read from device | tx_packets | drops | "
              "balanced |", "|---|---|---|---|---|---|"]
    for ns, b in r["balance"].items():
        for fan in FANS:
            f = b[fan]
            drops = ", ".join(f"{k} {v}" for k, v in f["drops"].items()) or "-"
            lines.append(f"| {ns} | {fan} | {f['read']} | {f['tx_packets']} | "
                         f"{drops} | {'yes' if f['balanced'] else 'NO'} |")
    lines += ["", "Receive-loop drops: " + "; ".join(
        f"{ns} {loop}: {d or 'none'}" for ns, b in r["balance"].items()
        for loop, d in b["rx_drops"].items())]
    lines += ["", "| stream (from host-fan) | sent | received | lost |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['sent']} | {v['received']} | {v['lost']} |"
              for k, v in r["loss"].items()]
    lines += ["", "Datagrams the receiving endpoints' own sockets dropped (the instrument, "
              "not a fan): " + ", ".join(f"{ns} {n}" for ns, n in
                                         r.get("endpoint_socket_drops", {}).items())]
    return "\n".join(lines) + "\n"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "endpoint":
        endpoint(*sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--rate", type=float, default=500, help="datagrams/s per stream")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--check", action="store_true", help="exit 1 if a check fails")
    ap.add_argument("--prefix", default=os.environ.get("FANPKT_TEST_NS", "fps"))
    args = ap.parse_args()
    lab = Lab(f"{args.prefix}soak-")
    try:
        report = soak(lab, args.minutes, args.rate,
                      lambda m: print(f"soak: {m}", flush=True))
    finally:
        lab.close()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "soak.json"), "w") as f:
        json.dump(report, f, indent=1)
    md = markdown(report)
    with open(os.path.join(args.out, "soak.md"), "w") as f:
        f.write(md)
    print(md)
    failed = [k for k, v in report["checks"].items() if not v]
    if failed:
        print(f"soak: FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
