"""fanpkt/metrics.py: `fanpkt-forward --metrics ADDR:PORT` in network namespaces. Scrapes
over HTTP from inside the forwarder's namespace, parsed with prometheus_client's parser,
checked against `fanpkt stats --json` read just before and just after; hostile clients;
bad --metrics values."""
from __future__ import annotations

import json
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fanpkt import counters
from lab import FANPKT, FORWARD, nsx, ping, poll, start

METRICS = "127.0.0.1:9477"
FAN = ["-o", "241.0.0.0/8"]

# HTTP GET from inside a namespace: status line, then the body
GET = """
import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=10)
    print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code)
except OSError as e:
    print("error", e)
"""


def scrape(ns, url=f"http://{METRICS}/metrics") -> tuple[str, str]:
    out = nsx(ns, "python3", "-c", GET, url, check=False, timeout=30).stdout
    status, _, body = out.partition("\n")
    return status, body


def samples(body: str) -> dict:
    """{(sample name, sorted labels): value}"""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body) for s in fam.samples}


def stats_json(ns) -> dict:
    return json.loads(nsx(ns, *FANPKT, "stats", "--json").stdout)


def expected(snap: dict) -> dict:
    """The series a scrape should hold for a stats --json snapshot, by the documented
    naming: fanpkt_packets_total, fanpkt_bytes_total, fanpkt_dropped_packets_total{reason},
    fanpkt_<counter>_total."""
    out = {}
    for (fan, d), values in counters.by_fan(snap).items():
        for name, v in values.items():
            k = counters.kind(name)
            labels = {"fan": fan, "direction": d}
            if k.family == counters.DROPPED:
                metric, labels["reason"] = "fanpkt_dropped_packets_total", k.reason
            elif k.family == counters.PATH:
                metric = f"fanpkt_{name}_total"
            else:
                metric = f"fanpkt_{k.family}_total"
            out[(metric, tuple(sorted(labels.items())))] = v
    return out


def test_scrape_during_traffic_agrees_with_stats_json(lab):
    h1 = lab.host("h1", "172.16.1.1")
    h2 = lab.host("h2", "172.16.2.1")
    lab.forward(h1, *FAN, "-u", "172.16.1.1/16", "--metrics", METRICS)
    lab.forward(h2, *FAN, "-u", "172.16.2.1/16")
    # the frames lane: h1's engine holds h2 as a neighbour entry once the kernel resolved it
    assert ping(h1, "241.2.1.1").returncode == 0
    poll(lambda: samples(scrape(h1)[1]).get(
        ("fanpkt_neighbour_entries", (("fan", "fan-241"),))) == 1,
        "fanpkt_neighbour_entries{fan=fan-241} never became 1")
    # a ping flood runs until killed: traffic throughout the scrapes
    flood = subprocess.Popen(["ip", "netns", "exec", h1, "ping", "-f", "-n", "-q",
                              "241.2.1.1"], stdout=subprocess.DEVNULL)
    try:
        poll(lambda: stats_json(h1)["total"]["tx_packets"] > 1000, "no traffic")
        for _ in range(3):
            before = stats_json(h1)
            status, body = scrape(h1)
            after = stats_json(h1)
            assert status == "200"
            got, lo, hi = samples(body), expected(before), expected(after)
            assert set(lo) == set(hi) and set(lo) <= set(got)
            for key in lo:
                assert lo[key] <= got[key] <= hi[key], key
            for d in ("tx", "rx"):  # the scrape was taken during traffic, both ways
                moving = ("fanpkt_packets_total", (("direction", d), ("fan", "fan-241")))
                assert lo[moving] < hi[moving]
    finally:
        flood.kill()
    assert got[("fanpkt_fans", ())] == 1
    assert got[("fanpkt_loop_up", (("loop", "tx-241"),))] == 1
    assert got[("fanpkt_loop_up", (("loop", "rx"),))] == 1
    # every counter of the enum is exported in some family, for each fan and direction
    names = {k[0] for k in got}
    assert {"fanpkt_packets_total", "fanpkt_bytes_total", "fanpkt_dropped_packets_total",
            "fanpkt_tx_gso_total", "fanpkt_rx_ecn_ce_total"} <= names
    reasons = {dict(k[1])["reason"] for k in got if k[0] == "fanpkt_dropped_packets_total"}
    assert reasons == {counters.kind(n).reason for n in before["total"] if
                       n.startswith("drop_")}


def test_vxlan_and_ipip_fans_and_their_loops(lab, tmp_path):
    """Each loop's counters under its fan; a VXLAN port's receive loop under the VXLAN fan
    (on the userspace engine, whose loops these are; its peer h2 takes the default)."""
    h1 = lab.host("h1", "172.16.1.1")
    h2 = lab.host("h2", "172.16.2.1")
    conf = tmp_path / "fan"
    conf.write_text("241.0.0.0/8 172.16.1.1/16\n"
                    "240.0.0.0/8 172.16.1.1/16 type vxlan datapath user\n")
    lab.forward(h1, "-c", str(conf), "--metrics", METRICS, "--queues", "2")
    lab.forward(h2, "-o", "240.0.0.0/8", "-u", "172.16.2.1/16", "--type", "vxlan")
    assert ping(h1, "240.2.1.1").returncode == 0
    got = samples(scrape(h1)[1])
    assert got[("fanpkt_fans", ())] == 2
    assert {dict(k[1])["loop"] for k in got if k[0] == "fanpkt_loop_up"} == \
        {"tx-241", "tx-241.1", "tx-240", "tx-240.1", "rx", "rx.1", "rx-vxlan-8472",
         "rx-vxlan-8472.1"}                 # one per queue, one per receive socket

    def pkts(fan, d):
        return got[("fanpkt_packets_total", (("direction", d), ("fan", fan)))]
    assert pkts("fan-240", "tx") >= 3 and pkts("fan-240", "rx") >= 3
    assert pkts("fan-241", "tx") == pkts("fan-241", "rx") == 0


def test_hostile_clients_do_not_stop_forwarding_or_scrapes(lab):
    h1 = lab.host("h1", "172.16.1.1")
    h2 = lab.host("h2", "172.16.2.1")
    p = lab.forward(h1, *FAN, "-u", "172.16.1.1/16", "--metrics", METRICS)
    lab.forward(h2, *FAN, "-u", "172.16.2.1/16")
    # garbage gets an HTTP error and the connection closed; another path is still metrics
    hostile = r"""
import socket, sys, time
def conn():
    return socket.create_connection(("127.0.0.1", 9477), timeout=20)
for junk in (b"\x00\xff garbage GARBAGE\r\n\r\n", b"GET /" + b"A" * 70000 + b" HTTP/1.1\r\n\r\n"):
    s = conn(); s.sendall(junk)
    got = b"".join(iter(lambda: s.recv(65536), b""))     # until the exporter closes
    print(b"Error code: 4" in got, got.count(b"fanpkt_"))
    s.close()
# slowloris: more connections than the exporter serves at once, each sending a header
# line now and then; each must be cut off by the exporter, not by us
slow = [conn() for _ in range(12)]
for s in slow:
    s.sendall(b"GET /metrics HTTP/1.1\r\n")
print("listening", flush=True)
t0 = time.monotonic()
open_ = list(slow)
while open_ and time.monotonic() - t0 < 60:
    for s in list(open_):
        try:
            s.sendall(b"X-A: b\r\n")
            s.settimeout(0.3)
            if s.recv(100) == b"":
                open_.remove(s)
        except socket.timeout:
            pass
        except OSError:
            open_.remove(s)
print("all cut" if not open_ else f"{len(open_)} still open", flush=True)
"""
    r = subprocess.Popen(["ip", "netns", "exec", h1, "python3", "-c", hostile],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert r.stdout.readline().split() == ["True", "0"]       # 400, no metrics
        assert r.stdout.readline().split() == ["True", "0"]       # 414
        assert r.stdout.readline().strip() == "listening", r.stderr.read()
        # while the slow clients hold every slot: forwarding goes on
        assert ping(h1, "241.2.1.1").returncode == 0
        assert r.stdout.readline().strip() == "all cut"
        assert r.wait(timeout=30) == 0
    finally:
        r.kill()
    status, body = poll(lambda: (lambda s: s[0] == "200" and s)(scrape(h1)),
                        "no scrape served after the hostile clients")
    assert samples(body)[("fanpkt_fans", ())] == 1
    assert p.poll() is None
    assert lab.stop(p) == 0
    assert "Traceback" not in open(lab.logs[h1]).read()


def forward_once(ns, *args, timeout=20):
    return nsx(ns, *FORWARD, *args, check=False, timeout=timeout)


@pytest.mark.parametrize("value,status,message", [
    ("9477", 2, "give ADDRESS:PORT"),
    ("localhost:9477", 2, "give ADDRESS:PORT"),
    ("127.0.0.1:", 2, "--metrics port '' is not a number"),
    ("127.0.0.1:70000", 2, "--metrics port 70000 must be 1..65535"),
    ("127.0.0.1:0", 2, "--metrics port 0 must be 1..65535"),
    ("172.16.9.9:9477", 2, "no interface in this network namespace holds that address"),
])
def test_bad_metrics_values(lab, value, status, message):
    h1 = lab.host("h1", "172.16.1.1")
    r = forward_once(h1, *FAN, "-u", "172.16.1.1/16", "--metrics", value)
    assert r.returncode == status, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and message in r.stderr
    assert "fan-241" not in nsx(h1, "ip", "link").stdout


def test_metrics_port_in_use(lab):
    h1 = lab.host("h1", "172.16.1.1")
    listener = start(h1, "python3", "-c", "import socket, time; s = socket.create_server("
                     "('127.0.0.1', 9477)); print('listening', flush=True); time.sleep(60)")
    try:
        r = forward_once(h1, *FAN, "-u", "172.16.1.1/16", "--metrics", METRICS)
    finally:
        listener.kill()
    assert r.returncode == 10
    assert r.stderr == "fanpkt: --metrics 127.0.0.1:9477: the port is in use\n"
    assert "fan-241" not in nsx(h1, "ip", "link").stdout


def test_metrics_privileged_port_without_the_capability(lab):
    h1 = lab.host("h1", "172.16.1.1")
    r = nsx(h1, "setpriv", "--bounding-set=-net_bind_service", "--inh-caps=-all",
            *FORWARD, *FAN, "-u", "172.16.1.1/16", "--metrics", "127.0.0.1:80", check=False)
    assert r.returncode == 3
    assert r.stderr == ("fanpkt: --metrics 127.0.0.1:80: binding a port below 1024 needs "
                        "root (CAP_NET_BIND_SERVICE)\n")
    assert "fan-241" not in nsx(h1, "ip", "link").stdout
