"""fanpkt/watch.py: `fanpkt stats --watch [SECONDS]`. The table's text exactly, the loop on
scripted readings (clock and sleep given), then the command on a real forwarder with
traffic: piped output, Ctrl-C, the forwarder stopping, bad intervals."""
from __future__ import annotations

import io
import signal
import subprocess

import pytest

from fanpkt import cli
from fanpkt.counters import Rate
from fanpkt.errors import ConfigError, NotRunning
from fanpkt.watch import CLEAR, format_rates, human, seconds, watch
from lab import FANPKT, nsx, poll


def test_format_exact():
    rows = [Rate("fan-241", "tx", 1234.5, 1_851_750.0, 0.0),
            Rate("fan-241", "rx", 2.0, 196.0, 0.5),
            Rate("", "rx", 0.0, 0.0, 3.0)]
    assert format_rates(4242, 1.0004, rows) == (
        "fanpkt-forward pid 4242, rates over 1.00 s\n"
        "fan      dir   packets/s     bytes/s     drops/s\n"
        "fan-241  tx         1.2k        1.9M         0.0\n"
        "fan-241  rx          2.0       196.0         0.5\n"
        "-        rx          0.0         0.0         3.0")


@pytest.mark.parametrize("n,text", [(0, "0.0"), (999.94, "999.9"), (1000, "1.0k"),
                                    (2.5e6, "2.5M"), (7.25e9, "7.2G"), (3e12, "3000.0G")])
def test_human(n, text):
    assert human(n) == text


@pytest.mark.parametrize("text", ["0", "-1", "abc", "nan", "inf", "0.01", "1e9", ""])
def test_bad_interval(text):
    with pytest.raises(ConfigError, match="--watch"):
        seconds(text)


def snap(pid, tx):
    return {"pid": pid, "loops": {"tx:fan-241": {"tx_packets": tx, "tx_bytes": tx * 100,
                                                 "drop_tx_no_map": 0}},
            "loop_fans": {"tx:fan-241": ["fan-241"]}}


class Script:
    """Readings, a clock that advances only in sleep(), and a stop at the end: Ctrl-C
    (KeyboardInterrupt from sleep) or the forwarder gone (NotRunning from read)."""

    def __init__(self, readings, end):
        self.readings, self.end, self.now = list(readings), end, 0.0

    def read(self):
        if not self.readings:
            raise NotRunning("no fanpkt-forward is running in this network namespace")
        return self.readings.pop(0)

    def sleep(self, s):
        if not self.readings and self.end is KeyboardInterrupt:
            raise KeyboardInterrupt
        self.now += s


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_watch_prints_rates_and_stops_on_ctrl_c():
    s, out = Script([snap(1, 0), snap(1, 20), snap(1, 50)], KeyboardInterrupt), io.StringIO()
    assert watch(s.read, 2.0, out, clock=lambda: s.now, sleep=s.sleep) == 0
    blocks = out.getvalue().split("\n\n")
    assert [b.splitlines()[2].split() for b in blocks] == [
        ["fan-241", "tx", "10.0", "1.0k", "0.0"], ["fan-241", "tx", "15.0", "1.5k", "0.0"]]
    assert CLEAR not in out.getvalue()
    # on a terminal each table replaces the last
    s, tty = Script([snap(1, 0), snap(1, 20), snap(1, 50)], KeyboardInterrupt), Tty()
    assert watch(s.read, 2.0, tty, clock=lambda: s.now, sleep=s.sleep) == 0
    assert tty.getvalue().count(CLEAR) == 2 and tty.getvalue().startswith(CLEAR)


def test_watch_ends_when_the_forwarder_stops():
    s = Script([snap(1, 0), snap(1, 20)], NotRunning)
    with pytest.raises(NotRunning, match="fanpkt-forward stopped"):
        watch(s.read, 1.0, io.StringIO(), clock=lambda: s.now, sleep=s.sleep)


def test_watch_and_json_together_is_refused(capsys):
    assert cli.main(["stats", "--watch", "--json", "--run-dir", "/nonexistent"]) == 2
    assert "--watch prints rates as text" in capsys.readouterr().err


# -- the command on a real forwarder ----------------------------------------------------
def test_watch_on_real_traffic(lab):
    h1 = lab.host("h1", "172.16.1.1")
    h2 = lab.host("h2", "172.16.2.1")
    p1 = lab.forward(h1, "-o", "241.0.0.0/8", "-u", "172.16.1.1/16")
    lab.forward(h2, "-o", "241.0.0.0/8", "-u", "172.16.2.1/16")
    pinger = subprocess.Popen(["ip", "netns", "exec", h1, "ping", "-n", "-q", "-i", "0.01",
                               "241.2.1.1"], stdout=subprocess.DEVNULL)
    w = subprocess.Popen(["ip", "netns", "exec", h1, *FANPKT, "stats", "--watch", "0.3"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def row(fan, d):
            """The next table's row for (fan, d), as [packets/s, bytes/s, drops/s]."""
            assert w.stdout.readline().startswith("fanpkt-forward pid ")
            assert w.stdout.readline().split() == ["fan", "dir", "packets/s", "bytes/s",
                                                   "drops/s"]
            rows = {}
            for line in iter(w.stdout.readline, "\n"):
                f, dd, *vals = line.split()
                rows[(f, dd)] = vals
            assert set(rows) == {("fan-241", "tx"), ("fan-241", "rx")}
            return rows[(fan, d)]
        # the pings and their replies: both directions move (100 pings a second at most)
        poll(lambda: float(row("fan-241", "tx")[0]) > 10 and
             float(row("fan-241", "rx")[0]) > 10, "no rates of the traffic", timeout=20,
             every=0)
        w.send_signal(signal.SIGINT)                   # Ctrl-C
        out, err = w.communicate(timeout=10)
        assert w.returncode == 0 and err == ""
        # the forwarder stops under a watch: a clear line, exit status 6
        w = subprocess.Popen(["ip", "netns", "exec", h1, *FANPKT, "stats", "--watch", "0.2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert w.stdout.readline().startswith("fanpkt-forward pid ")
        assert lab.stop(p1) == 0
        out, err = w.communicate(timeout=10)
        assert w.returncode == 6
        assert err == ("fanpkt: fanpkt-forward stopped (no forwarder runs in this network "
                       "namespace any more)\n")
    finally:
        w.kill()
        pinger.kill()


def test_watch_with_nothing_running(lab):
    h1 = lab.host("h1", "172.16.1.1")
    r = nsx(h1, *FANPKT, "stats", "--watch", check=False)
    assert r.returncode == 6 and r.stderr == \
        "fanpkt: no fanpkt-forward is running in this network namespace\n"
    r = nsx(h1, *FANPKT, "stats", "--watch", "0", check=False)
    assert r.returncode == 2 and "--watch '0'" in r.stderr
