"""`fanpkt map`, run as users run it: a subprocess, stdout, stderr, exit status."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vectors import VECTORS


def fanpkt(*args):
    p = subprocess.run([sys.executable, "-m", "fanpkt.cli", *args], capture_output=True,
                       text=True, timeout=60)
    return p.returncode, p.stdout, p.stderr


def test_examples_from_the_issue():
    assert fanpkt("map", "-o", "241.0.0.0/8", "-u", "172.16.0.0/16", "241.6.7.8") == \
        (0, "172.16.6.7\n", "")
    assert fanpkt("map", "-o", "241.0.0.0/8", "-u", "172.16.0.0/16", "172.16.3.4") == \
        (0, "241.3.4.0/24\n", "")
    assert fanpkt("map", "-o", "241.0.0.0/8", "-u", "172.16.3.4/16", "241.6.7.8")[1] == \
        "172.16.6.7\n"


def test_every_vector_in_one_call_per_map():
    for overlay, underlay, host, slc, dst, under in VECTORS:
        code, out, err = fanpkt("map", "-o", overlay, "-u", underlay, dst, host)
        want_dst = under or "unroutable"
        assert out.splitlines() == [want_dst, slc]
        assert code == (0 if under else 1)
        if under is None:
            assert "unroutable" in err and err.count("\n") == 1


def test_json():
    code, out, _ = fanpkt("map", "--json", "-o", "241", "-u", "172.16.0.0/16", "241.6.7.8",
                          "172.16.3.4")
    first, second = (json.loads(line) for line in out.splitlines())
    assert first["underlay_host"] == "172.16.6.7" and first["slice"] == "241.6.7.0/24"
    assert second == {"address": "172.16.3.4", "kind": "underlay", "routable": True,
                      "slice": "241.3.4.0/24", "gateway": "241.3.4.1",
                      "host_reserved": ["241.3.4.1", "241.3.4.1"],
                      "usable_first": "241.3.4.2", "usable_last": "241.3.4.254",
                      "usable_count": 253, "broadcast": "241.3.4.255",
                      "overlay": "241.0.0.0/8", "underlay": "172.16.0.0/16",
                      "device": "fan-241"}


@pytest.mark.parametrize("args,message", [
    (["-o", "241.0.0.0/8", "-u", "172.16.0.0/16", "8.8.8.8"], "inside neither"),
    (["-o", "241.0.0.0/8", "-u", "172.16.0.0/16", "banana"], "'banana' is not an IPv4"),
    (["-o", "241.1.0.0/8", "-u", "172.16.0.0/16", "241.1.1.1"], "not a network address"),
    (["-o", "241.0.0.0/8", "-u", "172.16.0.0/8", "241.1.1.1"], "must be longer"),
    (["-o", "241.0.0.0/8", "241.1.1.1"], "required"),
])
def test_errors_are_one_line_exit_2(args, message):
    code, out, err = fanpkt("map", *args)
    assert code == 2 and out == ""
    assert err.startswith("fanpkt: ") and err.count("\n") == 1 and message in err
