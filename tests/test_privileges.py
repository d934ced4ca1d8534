"""fanpkt/privileges.py: once its fans are up, the forwarder keeps only the capabilities
a reload and the stop need (privileges.KEEP), in every set including the bounding set, and
runs with no_new_privs. A reload that adds a VXLAN fan with a bridge and dhcp (TAP, UDP
socket, bridge, dnsmasq dropping to nobody) and the stop that ends that dnsmasq still work
with what is kept."""
from __future__ import annotations

import signal

from fanpkt import privileges

from lab import DHCP_DISCOVER, dnsmasq_in, nsx, ping, poll, sh, start


def status(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_forwarder_keeps_only_what_reload_and_stop_need(lab, tmp_path):
    import sys
    h1 = lab.host("h1", "172.16.1.1")
    h2 = lab.host("h2", "172.16.2.1")
    conf = tmp_path / "fan"
    conf.write_text("241.0.0.0/8 172.16.1.1/16\n")
    p = lab.forward(h1, "-c", str(conf))
    lab.forward(h2, "-o", "241.0.0.0/8", "-u", "172.16.2.1/16")
    keep = privileges.keep_mask()
    s = poll(lambda: (lambda s: s if int(s["CapEff"], 16) == keep else None)(status(p.pid)),
             "the forwarder never dropped its capabilities")
    assert int(s["CapPrm"], 16) == int(s["CapBnd"], 16) == keep
    assert int(s["CapInh"], 16) == int(s.get("CapAmb", "0"), 16) == 0
    assert s["NoNewPrivs"].strip() == "1"
    assert ping(h1, "241.2.1.1").returncode == 0
    # A reload after the drop: a VXLAN fan with its own bridge, TAP, UDP port and dnsmasq.
    conf.write_text("241.0.0.0/8 172.16.1.1/16\n"
                    "250.0.0.0/8 172.16.1.1/16 type vxlan bridge fanvx dhcp\n")
    p.send_signal(signal.SIGHUP)
    poll(lambda: dnsmasq_in(h1), "the reloaded fan's dnsmasq never ran")
    cns = f"{lab.prefix}c1"
    lab._add_ns(cns)
    sh("ip", "link", "add", "eth0", "netns", cns, "type", "veth", "peer", "name", "vc1",
       "netns", h1)
    nsx(h1, "ip", "link", "set", "vc1", "master", "fanvx", "up")
    nsx(cns, "ip", "link", "set", "eth0", "up")
    client = start(cns, sys.executable, "-c", DHCP_DISCOVER)
    out = client.communicate(timeout=60)[0].split()
    assert out[1:3] == ["250.1.1.1", "1450"], out       # served by the reloaded fan
    # The stop removes it all, dnsmasq (now running as nobody) included.
    assert lab.stop(p) == 0
    assert dnsmasq_in(h1) == []
    assert nsx(h1, "ip", "link", "show", "fanvx", check=False).returncode != 0
