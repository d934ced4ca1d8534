"""The Prometheus exporter of fanpkt-forward (`--metrics ADDR:PORT`): a collector that reads
the forwarder's counters at scrape time, and the small HTTP server that serves it.

Imported only with --metrics, so a forwarder without it never loads prometheus_client.

The collector reads the counter file through RunState.snapshot(), the same totals() that
`fanpkt stats --json` prints, and groups it as fanpkt/counters.py does: nothing is counted
per packet and no thread polls. Metric families (docs/spec.md §5, "Metrics"):
  fanpkt_packets_total, fanpkt_bytes_total                  {fan, direction}
  fanpkt_dropped_packets_total                              {fan, direction, reason}
  fanpkt_<counter>_total for every other counter (paths)     {fan, direction}
  fanpkt_fans, fanpkt_neighbour_entries {fan}, fanpkt_loop_up {loop}

The server runs on a daemon thread. Hostile clients must cost the forwarder nothing but
this thread's time: at most MAX_CLIENTS connections are served at once (more are closed at
accept), each read or write waits at most CLIENT_TIMEOUT, and a connection still open
CLIENT_DEADLINE after accept (slowloris: a byte now and then) is shut down. The loops run
without the GIL, so a scrape does not slow them.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import socketserver
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from . import counters
from .errors import AddressInUse, ConfigError, PrivilegeError

try:
    from prometheus_client import make_wsgi_app
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import CollectorRegistry
except ImportError:     # pragma: no cover - a broken install
    raise ConfigError("--metrics needs the Python package prometheus-client "
                      "(pip install prometheus-client)") from None
from .fanmap import decimal

log = logging.getLogger("fanpkt")
MAX_CLIENTS = 8
CLIENT_TIMEOUT = 5.0        # seconds one read or write of a client may block
CLIENT_DEADLINE = 10.0      # seconds a connection may last
POLL = 0.2                  # how often the server thread looks for overdue connections

HELP = {
    counters.PACKETS: "Packets carried: tx outer packets sent to the underlay, rx inner "
                      "packets written to the fan's TUN/TAP.",
    counters.BYTES: "Bytes of those packets (tx from the outer IP header, rx inner).",
    counters.DROPPED: "Packets dropped, by direction and reason (drop_<direction>_<reason> "
                      "in fanpkt stats).",
}


def parse_address(text: str) -> tuple[int, tuple]:
    """ADDR:PORT (IPv4, or IPv6 in brackets) -> (address family, socket address)."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"--metrics {text!r}: give ADDRESS:PORT with a numeric address, "
                          "e.g. 127.0.0.1:9477 or [::1]:9477") from None
    n = decimal(port, "--metrics port", 1, 65535)
    if addr.version == 6:
        return socket.AF_INET6, (str(addr), n, 0, 0)
    return socket.AF_INET, (str(addr), n)


class FanCollector:
    """Reads a Forwarder's counters and state at each scrape (prometheus_client calls
    collect() from the server thread)."""

    def __init__(self, fwd):
        self.fwd = fwd

    def collect(self):
        snap = self.fwd.run.snapshot()
        families: dict[str, CounterMetricFamily] = {}

        def family(name: str, k: counters.Kind) -> CounterMetricFamily:
            key = k.family if k.family != counters.PATH else name
            if key not in families:
                labels = ["fan", "direction"] + (["reason"] if k.family == counters.DROPPED
                                                 else [])
                metric = ("dropped_packets" if k.family == counters.DROPPED else key)
                families[key] = CounterMetricFamily(
                    f"fanpkt_{metric}", HELP.get(k.family, f"Counter {name} of fanpkt stats "
                                                 "(docs/spec.md §5)."), labels=labels)
            return families[key]

        if snap is not None:
            for (fan, d), values in counters.by_fan(snap).items():
                for name, v in values.items():
                    k = counters.kind(name)
                    labels = [fan, d] + ([k.reason] if k.family == counters.DROPPED else [])
                    family(name, k).add_metric(labels, v)
        yield from families.values()

        fans = list(self.fwd.fans.values())
        yield GaugeMetricFamily("fanpkt_fans", "Fans up.", value=len(fans))
        entries = self.fwd.neigh_entries
        neigh = GaugeMetricFamily(
            "fanpkt_neighbour_entries", "Underlay hosts frames go to directly (the engine's "
            "neighbour table), per fan: entries in its underlay on its interface.",
            labels=["fan"])
        for f in fans:
            m, idx = f.spec.map, f.underlay.index
            neigh.add_metric([f.device.name], sum(1 for a, i, _ in entries
                                               if i == idx and m.in_underlay(a)))
        yield neigh
        path = GaugeMetricFamily(
            "fanpkt_fan_datapath", "1 for the data path each fan runs on: kernel (the "
            "kernel's vxlan driver steered by eBPF) or user (the userspace engine).",
            labels=["fan", "datapath"])
        for f in fans:
            path.add_metric([f.device.name, f.datapath], 1)
        yield path
        up = GaugeMetricFamily("fanpkt_loop_up", "1 while the forwarding loop's thread "
                               "runs, else 0 (the process then stops, exit status 9).",
                               labels=["loop"])
        for name, alive in self.fwd.loops().items():
            up.add_metric([name], 1 if alive else 0)
        yield up


class _Handler(WSGIRequestHandler):
    timeout = CLIENT_TIMEOUT            # StreamRequestHandler sets it on the connection

    def log_message(self, *args) -> None:      # no line per request in the journal
        pass


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def __init__(self, af: int, addr: tuple, app):
        self.address_family = af
        self.lock = threading.Lock()
        self.active: dict[socket.socket, float] = {}    # connection -> its deadline
        super().__init__(addr, _Handler)
        self.set_app(app)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for the name of the address (getfqdn): skip it
        socketserver.TCPServer.server_bind(self)
        host, self.server_port = self.server_address[:2]
        self.server_name = str(host)
        self.setup_environ()

    def process_request(self, request, client_address) -> None:
        with self.lock:
            full = len(self.active) >= MAX_CLIENTS
            if not full:
                self.active[request] = time.monotonic() + CLIENT_DEADLINE
        if full:
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self.lock:     # never closed while service_actions shuts it down
            self.active.pop(request, None)
        super().shutdown_request(request)

    def service_actions(self) -> None:
        """Called by serve_forever every POLL: end connections past their deadline."""
        self.cut(time.monotonic())

    def cut(self, now: float) -> None:
        with self.lock:
            for conn, deadline in self.active.items():
                if deadline <= now:
                    try:
                        conn.shutdown(socket.SHUT_RDWR)     # its handler then ends
                    except OSError:
                        pass

    def handle_error(self, request, client_address) -> None:
        # a client that hangs up, times out or sends garbage is not the forwarder's error
        log.debug("metrics client %s", client_address, exc_info=True)


class Exporter:
    """Binds at construction, so a bad address fails before anything else is set up;
    serves from start() until close()."""

    def __init__(self, text: str, fwd):
        af, addr = parse_address(text)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(FanCollector(fwd))
        try:
            self.server = _Server(af, addr, make_wsgi_app(registry))
        except OSError as e:
            where = f"--metrics {text}"
            if e.errno == errno.EADDRINUSE:
                raise AddressInUse(f"{where}: the port is in use") from None
            if e.errno == errno.EACCES:
                raise PrivilegeError(f"{where}: binding a port below 1024 needs root "
                                     "(CAP_NET_BIND_SERVICE)") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"{where}: no interface in this network namespace holds "
                                  "that address") from None
            raise ConfigError(f"{where}: cannot listen there ({e.strerror})") from None
        self.thread: threading.Thread | None = None

    @property
    def address(self) -> tuple:
        return self.server.server_address

    def start(self) -> None:
        self.thread = threading.Thread(target=self.server.serve_forever, args=(POLL,),
                                       name="metrics", daemon=True)
        self.thread.start()
        log.info("metrics on http://%s/metrics", _url_host(self.address))

    def close(self) -> None:
        """Stop accepting, end open connections, wait briefly for their handlers."""
        if self.thread is not None:
            self.server.shutdown()
            self.thread.join()
        self.server.cut(float("inf"))
        self.server.server_close()
        until = time.monotonic() + 1.0
        while self.server.active and time.monotonic() < until:
            time.sleep(0.01)


def _url_host(addr: tuple) -> str:
    host, port = addr[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
