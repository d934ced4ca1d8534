"""fanpkt demo: three hosts on one underlay, each running fanpkt-forward with two fans
side by side - an IPIP fan 241.0.0.0/8 (fanctl's) and a VXLAN fan 250.0.0.0/8 (LXD's) -
and real LXC containers (busybox) on the fan bridges of two of them, which take address
and MTU by DHCP from fanpkt's dnsmasq. Shows pings across both fans, TCP transfers between
the containers, `fanpkt show` and `fanpkt stats`; removes everything at the end, also on
Ctrl-C or an error.

    tools/demo.sh        (as root, or with sudo; sets up the machine first)
"""
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


def say(text):
    print(f"\n== {text}", flush=True)


def show(ns, *cmd):
    r = nsx(ns, *cmd, check=False, timeout=120)
    print((r.stdout + r.stderr).rstrip())


def transfer(lxc, server, client, addr, nbytes):
    """nbytes over HTTP from server to client (busybox httpd and wget), SHA-256 checked."""
    digest = lxc.serve(server, nbytes)
    t0 = time.monotonic()
    size, got = lxc.fetch(client, addr)
    dt = time.monotonic() - t0
    print(f"{client} fetched {size} bytes from {server} ({addr}): sha256 {got[:16]}…, "
          f"served {digest[:16]}… {'MATCH' if got == digest else 'MISMATCH'}; "
          f"{size * 8 / dt / 1e9:.2f} Gbit/s (busybox httpd and wget, into a tmpfs)")


def main():
    if os.geteuid() != 0:
        sys.exit("demo: run as root (it creates network namespaces and containers)")
    if shutil.which("lxc-start") is None:
        sys.exit("demo: LXC is missing (tools/demo.sh installs it with tools/setup.sh)")
    lxc = Lxc(os.path.join(tempfile.gettempdir(), f"fandemo-lxc-{os.getpid()}"))
    lab = Lab(f"fandemo{os.getpid() % 10000}-")
    try:
        say("underlay 172.16.0.0/16: three hosts on one bridge; an IPIP fan 241.0.0.0/8 and "
            "a VXLAN fan 250.0.0.0/8 on each (one /etc/network/fan-style file a host)")
        hosts = {}
        for i, addr in ((1, "172.16.3.4"), (2, "172.16.6.7"), (3, "172.16.9.1")):
            ns = lab.host(f"host{i}", addr)
            ipip, vxlan = ("bridge fanbr dhcp", "dhcp") if i != 2 else ("", "")
            conf = f"/tmp/{ns}.fan"
            with open(conf, "w") as f:
                f.write(f"241.0.0.0/8 {addr}/16 {ipip}\n"
                        f"250.0.0.0/8 {addr}/16 type vxlan {vxlan}\n")
            lab.forward(ns, "-c", conf)
            hosts[i] = ns
            tail = addr.split(".", 2)[2]
            print(f"{ns}: {addr} owns 241.{tail}.0/24 (IPIP) and 250.{tail}.0/24 (VXLAN)"
                  + (", DHCP on both fan bridges" if i != 2 else ""))
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
        say(f"fanpkt show  (on {hosts[1]})")
        show(hosts[1], *FANPKT, "show")
        say("one route per host, no per-peer state")
        show(hosts[1], "ip", "-4", "route")
        say("ping host1 -> host2's slice gateway, container c1 -> container c3")
        show(hosts[1], "ping", "-n", "-c", "3", "-i", "0.2", "241.6.7.1")
        print(lxc.run("c1", "ping", "-c", "3", "-i", "0.2", addrs["c3"],
                      check=False).stdout.rstrip())
        say("the VXLAN fan: host1 -> host2's gateway, container v1 -> container v3; ARP "
            "crossed the fan as unicast VXLAN")
        show(hosts[1], "ping", "-n", "-c", "3", "-i", "0.2", "250.6.7.1")
        print(lxc.run("v1", "ping", "-c", "3", "-i", "0.2", addrs["v3"],
                      check=False).stdout.rstrip())
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
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)
    finally:
        say("tearing down (containers stopped and destroyed, forwarders stopped with "
            "SIGTERM, namespaces deleted)")
        lxc.close()
        lab.close()
        for ns, log in lab.logs.items():
            os.unlink(log)
            if os.path.exists(f"/tmp/{ns}.fan"):
                os.unlink(f"/tmp/{ns}.fan")
        print("done")


if __name__ == "__main__":
    main()
