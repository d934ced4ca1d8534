"""fanpkt demo: three hosts on one underlay, each running fanpkt-forward with two fans
side by side - an IPIP fan 241.0.0.0/8 (fanctl's) and a VXLAN fan 250.0.0.0/8 (LXD's) -
and real containers on the fan bridges of two of them. Shows pings across both fans, TCP
transfers between the containers, `fanpkt show` and `fanpkt stats`; removes everything at
the end, also on Ctrl-C or an error.

    tools/demo.sh [--runtime lxc|lxd]     (as root, or with sudo; sets up the machine first)

--runtime lxc: LXC containers (busybox) on both fans' bridges, addresses and MTU by DHCP
from fanpkt's dnsmasq. --runtime lxd (the default where LXD is installed): an LXD daemon
on each of the two hosts, its containers on an LXD-managed bridge that holds the VXLAN
fan's slice gateway and that fanpkt joins (docs/lxd.md), addresses from LXD's DHCP.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
sys.path.insert(0, TESTS)           # the lab and container helpers the tests use
from containers import Lxc  # noqa: E402
from lab import FANPKT, Lab, nsx  # noqa: E402
from lxd import Lxd, build_image, fan_network  # noqa: E402

HOSTS = ((1, "172.16.3.4"), (2, "172.16.6.7"), (3, "172.16.9.1"))


def say(text):
    print(f"\n== {text}", flush=True)


def show(ns, *cmd):
    r = nsx(ns, *cmd, check=False, timeout=120)
    print((r.stdout + r.stderr).rstrip())


def report(client, server, addr, size, got, digest, dt, into):
    print(f"{client} fetched {size} bytes from {server} ({addr}): sha256 {got[:16]}…, "
          f"served {digest[:16]}… {'MATCH' if got == digest else 'MISMATCH'}; "
          f"{size * 8 / dt / 1e9:.2f} Gbit/s (busybox httpd and wget, into {into})")


def transfer(lxc, server, client, addr, nbytes):
    """nbytes over HTTP from server to client (busybox httpd and wget), SHA-256 checked."""
    digest = lxc.serve(server, nbytes)
    t0 = time.monotonic()
    size, got = lxc.fetch(client, addr)
    report(client, server, addr, size, got, digest, time.monotonic() - t0, "a tmpfs")


def fan_hosts(lab, bridges):
    """The three hosts, each with both fans; bridges(i, addr) gives host i's IPIP and
    VXLAN fan flags, and may prepare the host (namespace ns) first."""
    say("underlay 172.16.0.0/16: three hosts on one bridge; an IPIP fan 241.0.0.0/8 and "
        "a VXLAN fan 250.0.0.0/8 on each (one /etc/network/fan-style file a host)")
    hosts = {}
    for i, addr in HOSTS:
        ns = lab.host(f"host{i}", addr)
        ipip, vxlan, what = bridges(i, ns)
        conf = f"/tmp/{ns}.fan"
        with open(conf, "w") as f:
            f.write(f"241.0.0.0/8 {addr}/16 {ipip}\n"
                    f"250.0.0.0/8 {addr}/16 type vxlan {vxlan}\n")
        lab.forward(ns, "-c", conf)
        hosts[i] = ns
        tail = addr.split(".", 2)[2]
        print(f"{ns}: {addr} owns 241.{tail}.0/24 (IPIP) and 250.{tail}.0/24 (VXLAN)"
              + (f", {what}" if what else ""))
    return hosts


def common_views(hosts, ping_c1_c3, ping_v1_v3):
    say(f"fanpkt show  (on {hosts[1]})")
    show(hosts[1], *FANPKT, "show")
    say("one route per host, no per-peer state")
    show(hosts[1], "ip", "-4", "route")
    say("ping host1 -> host2's slice gateway" + (", container c1 -> container c3"
                                                 if ping_c1_c3 else ""))
    show(hosts[1], "ping", "-n", "-c", "3", "-i", "0.2", "241.6.7.1")
    if ping_c1_c3:
        ping_c1_c3()
    say("the VXLAN fan: host1 -> host2's gateway, container v1 -> container v3; ARP "
        "crossed the fan as unicast VXLAN")
    show(hosts[1], "ping", "-n", "-c", "3", "-i", "0.2", "250.6.7.1")
    ping_v1_v3()


def run_lxc(lab, tmp):
    lxc = Lxc(os.path.join(tmp, "lxc"))
    try:
        hosts = fan_hosts(lab, lambda i, ns: ("bridge fanbr dhcp", "dhcp",
                                              "DHCP on both fan bridges") if i != 2
                          else ("", "", ""))
        say("LXC containers (busybox) on host1 and host3: c1, c3 on the IPIP fan's bridge "
            "fanbr, v1, v3 on the VXLAN fan's fanbr-250; each starts with MTU 1500 and "
            "asks DHCP")
        addrs = {}
        for name, i, bridge in (("c1", 1, "fanbr"), ("c3", 3, "fanbr"),
                                ("v1", 1, "fanbr-250"), ("v3", 3, "fanbr-250")):
            lxc.start(hosts[i], name, bridge)
        for name in ("c1", "c3", "v1", "v3"):
            got = lxc.lease(name)
            addrs[name] = got["addr"]
            print(f"{name}: eth0 {got['addr']}/{got['plen']} mtu {got['mtu']}, "
                  f"default via {got['router']}")

        def pinger(a, b):
            return lambda: print(lxc.run(a, "ping", "-c", "3", "-i", "0.2", addrs[b],
                                         check=False).stdout.rstrip())
        common_views(hosts, pinger("c1", "c3"), pinger("v1", "v3"))
        show(hosts[1], "ip", "neigh", "show", "dev", "fanbr-250")
        say("fanpkt map: where does c3 live?")
        print(subprocess.run([*FANPKT, "map", "-o", "241.0.0.0/8", "-u", "172.16.0.0/16",
                              addrs["c3"]], capture_output=True, text=True).stdout.strip())
        say("64 MiB TCP, container c3 -> container c1 across the IPIP fan, and v3 -> v1 "
            "across the VXLAN fan")
        transfer(lxc, "c3", "c1", addrs["c3"], 64 << 20)
        transfer(lxc, "v3", "v1", addrs["v3"], 64 << 20)
        say(f"fanpkt stats  (on {hosts[1]})")
        show(hosts[1], *FANPKT, "stats")
    finally:
        say("tearing down (containers stopped and destroyed, forwarders stopped with "
            "SIGTERM, namespaces deleted)")
        lxc.close()


def run_lxd(lab, tmp):
    daemons = {}
    try:
        image = build_image(os.path.join(tmp, "image"))

        def lxd_bridge(i, ns):
            if i == 2:
                return "", "", ""
            # LXD first: its bridge holds the slice gateway, fanpkt joins it
            lxd = daemons[i] = Lxd(ns, os.path.join(tmp, f"lxd{i}"))
            lxd.import_image(*image)
            tail = HOSTS[i - 1][1].split(".", 2)[2]
            lxd.create_network("lxdfan0", fan_network(f"250.{tail}"))
            return "", "bridge lxdfan0", "an LXD daemon with its bridge lxdfan0 on the VXLAN fan"
        hosts = fan_hosts(lab, lxd_bridge)
        say("on host1 and host3: `lxc network show lxdfan0` (an LXD-managed bridge holding "
            "the slice gateway; LXD's dnsmasq gives out the slice, LXD NATs to the outside)")
        print(daemons[1].lxc("network", "show", "lxdfan0").stdout.rstrip())
        say("`lxc launch busybox v1 --network lxdfan0` on host1, v3 on host3 (an image "
            "built from this machine's busybox, imported with `lxc image import`)")
        names, addrs = {}, {}
        for i in (1, 3):
            names[i] = f"{lab.prefix}v{i}"
            daemons[i].launch(names[i], "lxdfan0")
        for i in (1, 3):
            addrs[i] = daemons[i].address(names[i])
            say(f"lxc list  (on {hosts[i]})")
            print(daemons[i].list().rstrip())
        common_views(hosts, None, lambda: print(daemons[1].exec(
            names[1], "ping", "-c", "3", "-i", "0.2", addrs[3], check=False).stdout.rstrip()))
        show(hosts[1], "ip", "neigh", "show", "dev", "lxdfan0")
        say("64 MiB TCP, LXD container v3 -> v1 across the VXLAN fan (lxc exec: httpd, wget)")
        digest = daemons[3].serve(names[3], 64 << 20)
        t0 = time.monotonic()
        size, got = daemons[1].fetch(names[1], f"http://{addrs[3]}/blob")
        report(names[1], names[3], addrs[3], size, got, digest, time.monotonic() - t0,
               "the container's disk")
        say(f"fanpkt stats  (on {hosts[1]})")
        show(hosts[1], *FANPKT, "stats")
    finally:
        say("tearing down (LXD: containers, images, bridges and pools deleted, daemons "
            "shut down; forwarders stopped with SIGTERM, namespaces deleted)")
        for lxd in daemons.values():
            for problem in lxd.close():
                print(f"LXD: {problem}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", choices=("lxc", "lxd"),
                    default="lxd" if shutil.which("lxd") else "lxc",
                    help="the containers: LXC's busybox template, or LXD (default where "
                         "LXD is installed)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("demo: run as root (it creates network namespaces and containers)")
    tool = {"lxc": "lxc-start", "lxd": "lxd"}[args.runtime]
    if shutil.which(tool) is None:
        sys.exit(f"demo: {args.runtime.upper()} is missing (tools/demo.sh installs it with "
                 "tools/setup.sh)")
    tmp = tempfile.mkdtemp(prefix=f"fandemo-{os.getpid()}-")
    os.chmod(tmp, 0o711)
    lab = Lab(f"fandemo{os.getpid() % 10000}-")
    try:
        (run_lxd if args.runtime == "lxd" else run_lxc)(lab, tmp)
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)
    finally:
        lab.close()
        shutil.rmtree(tmp, ignore_errors=True)
        for ns, log in lab.logs.items():
            os.unlink(log)
            if os.path.exists(f"/tmp/{ns}.fan"):
                os.unlink(f"/tmp/{ns}.fan")
        print("done")


if __name__ == "__main__":
    main()
