"""fanpkt demo: three hosts on one underlay, each running fanpkt-forward with two fans
side by side - an IPIP fan 241.0.0.0/8 (fanctl's) and a VXLAN fan 250.0.0.0/8 (LXD's) -
with a container on two of them. Shows pings across both fans, a TCP transfer, `fanpkt
show` and `fanpkt stats`; removes everything at the end, also on Ctrl-C or an error.

    sudo tools/demo.sh        (sets up the machine first)
"""
import os
import subprocess
import sys
import time

TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
sys.path.insert(0, TESTS)           # the lab helpers the data-path tests use
from lab import FANPKT, Lab, nsx  # noqa: E402

TRAFFIC = [sys.executable, os.path.join(TESTS, "traffic.py")]


def say(text):
    print(f"\n== {text}", flush=True)


def show(ns, *cmd):
    r = nsx(ns, *cmd, check=False, timeout=120)
    print((r.stdout + r.stderr).rstrip())


def main():
    if os.geteuid() != 0:
        sys.exit("demo: run as root (it creates network namespaces)")
    lab = Lab(f"fandemo{os.getpid() % 10000}-")
    try:
        say("underlay 172.16.0.0/16: three hosts on one bridge; an IPIP fan 241.0.0.0/8 and "
            "a VXLAN fan 250.0.0.0/8 on each (one /etc/network/fan-style file a host)")
        hosts = {}
        for i, addr in ((1, "172.16.3.4"), (2, "172.16.6.7"), (3, "172.16.9.1")):
            ns = lab.host(f"host{i}", addr)
            bridge = " bridge fanbr" if i != 2 else ""
            conf = f"/tmp/{ns}.fan"
            with open(conf, "w") as f:
                f.write(f"241.0.0.0/8 {addr}/16{bridge}\n250.0.0.0/8 {addr}/16 type vxlan\n")
            lab.forward(ns, "-c", conf)
            hosts[i] = ns
            tail = addr.split(".", 2)[2]
            print(f"{ns}: {addr} owns 241.{tail}.0/24 (IPIP) and 250.{tail}.0/24 (VXLAN)")
        c1 = lab.container(hosts[1], "c1", "241.3.4.10", "241.3.4.1")
        c3 = lab.container(hosts[3], "c3", "241.9.1.30", "241.9.1.1")
        say(f"fanpkt show  (on {hosts[1]})")
        show(hosts[1], *FANPKT, "show")
        say("one route per host, no per-peer state")
        show(hosts[1], "ip", "-4", "route")
        say("ping host1 -> host2's slice gateway, container c1 -> container c3")
        show(hosts[1], "ping", "-n", "-c", "3", "-i", "0.2", "241.6.7.1")
        show(c1, "ping", "-n", "-c", "3", "-i", "0.2", "241.9.1.30")
        say("the VXLAN fan: host1 -> host3's gateway; ARP crossed the fan as unicast VXLAN")
        show(hosts[1], "ping", "-n", "-c", "3", "-i", "0.2", "250.9.1.1")
        show(hosts[1], "ip", "neigh", "show", "dev", "fanbr-250")
        say("fanpkt map: where does 241.9.1.30 live?")
        print(subprocess.run([*FANPKT, "map", "-o", "241.0.0.0/8", "-u", "172.16.0.0/16",
                              "241.9.1.30"], capture_output=True, text=True).stdout.strip())
        say("64 MiB TCP, container c1 -> container c3 across the fan (SHA-256 checked)")
        sink = subprocess.Popen(["ip", "netns", "exec", c3, *TRAFFIC, "tcp-sink", "5001"],
                                stdout=subprocess.PIPE, text=True)
        sink.stdout.readline()
        t0 = time.monotonic()
        sent = nsx(c1, *TRAFFIC, "tcp-send", "241.9.1.30", "5001", str(64 << 20),
                   timeout=300).stdout.split()
        dt = time.monotonic() - t0
        got = sink.communicate(timeout=60)[0].split()
        print(f"sent {sent[0]} bytes sha256 {sent[1][:16]}…, received sha256 {got[1][:16]}… "
              f"{'MATCH' if sent == got else 'MISMATCH'}; {sent and int(sent[0]) * 8 / dt / 1e9:.2f}"
              f" Gbit/s (Python sockets at both ends)")
        say(f"fanpkt stats  (on {hosts[1]})")
        show(hosts[1], *FANPKT, "stats")
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)
    finally:
        say("tearing down (forwarders stopped with SIGTERM, namespaces deleted)")
        lab.close()
        for ns, log in lab.logs.items():
            os.unlink(log)
            if os.path.exists(f"/tmp/{ns}.fan"):
                os.unlink(f"/tmp/{ns}.fan")
        print("done")


if __name__ == "__main__":
    main()
