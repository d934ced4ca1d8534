"""`fanpkt up` and `fanpkt down` against running forwarders (fanpkt/control.py): real
namespaces, fans changed at runtime carrying traffic, the control socket's root-only rule,
hostile clients, and the exit statuses of every refusal."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

import pytest

from lab import FANPKT, nsx, ping, poll

FAN = ["-o", "241.0.0.0/8"]
H1, H2 = "172.16.1.1", "172.16.2.1"


def control_path(ns) -> str:
    return f"/run/fanpkt/net-{os.stat(f'/run/netns/{ns}').st_ino}/control"


def fanpkt(ns, *args, **kw):
    return nsx(ns, *FANPKT, *args, check=False, **kw)


def ok(ns, *args):
    r = fanpkt(ns, *args)
    assert r.returncode == 0 and not r.stderr, r.stderr
    return r


def shown(ns) -> list[str]:
    """The overlays `fanpkt show` lists."""
    return [line.split()[2] for line in ok(ns, "show").stdout.splitlines()[1:]]


def hosts(lab, *args_of):
    """h1 and h2 on the underlay, each with a forwarder of 241.0.0.0/8 (or args_of[i])."""
    out = []
    for i, addr in enumerate((H1, H2)):
        ns = lab.host(f"h{i + 1}", addr)
        lab.forward(ns, *(args_of[i] if args_of else [*FAN, "-u", f"{addr}/16"]))
        out.append(ns)
    return out


def flood(ns, dst, count=300):
    return subprocess.Popen(["ip", "netns", "exec", ns, "ping", "-n", "-i", "0.01", "-c",
                             str(count), dst], stdout=subprocess.PIPE, text=True)


def lossless(p):
    out = p.communicate(timeout=60)[0]
    assert f"{p.args[-2]} packets transmitted, {p.args[-2]} received" in out, out


def test_up_at_runtime_carries_traffic_and_down_removes_it(lab):
    h1, h2 = hosts(lab)
    before = nsx(h1, "nft", "list", "ruleset").stdout
    busy = flood(h1, "241.2.1.1")
    # fanctl's option form on h1 (with plumbing to see removed), its positional form on h2
    ok(h1, "up", "-o", "10.0.0.0/8", "-u", f"{H1}/16", "bridge", "fb10", "nat")
    ok(h2, "up", "10.0.0.0/8", f"{H2}/16")
    ok(h1, "up", "-o", "240.0.0.0/8", "-u", f"{H1}/16", "--type", "vxlan")
    ok(h2, "up", "240.0.0.0/8", f"{H2}/16", "type", "vxlan")
    assert ping(h1, "10.2.1.1").returncode == 0         # the new fans, at once
    assert ping(h1, "240.2.1.1").returncode == 0
    lossless(busy)                                       # the old one lost nothing
    assert shown(h1) == ["241.0.0.0/8", "10.0.0.0/8", "240.0.0.0/8"]
    ok(h1, "down", "-o", "240")                          # fanctl's short overlay
    ok(h2, "down", "-o", "240.0.0.0/8")
    assert nsx(h1, "ip", "link", "show", "fanbr-240", check=False).returncode != 0
    assert "snat to 172.16.1.1" in nsx(h1, "nft", "list", "ruleset").stdout
    assert "10.1.1.1/24" in nsx(h1, "ip", "-4", "addr", "show", "fb10").stdout

    busy = flood(h1, "241.2.1.1")
    ok(h1, "down", "-o", "10.0.0.0/8")
    lossless(busy)
    assert shown(h1) == ["241.0.0.0/8"]
    for dev in ("fan-10", "fb10"):                       # device, bridge fanpkt made
        assert nsx(h1, "ip", "link", "show", dev, check=False).returncode != 0, dev
    assert "10.0.0.0/8" not in nsx(h1, "ip", "-4", "route").stdout
    assert nsx(h1, "nft", "list", "ruleset").stdout == before     # no NAT rule left
    assert ping(h1, "10.2.1.1", count=1).returncode != 0
    assert ping(h1, "241.2.1.1").returncode == 0
    ok(h2, "down", "10.0.0.0/8", f"{H2}/16")            # positional down: O U
    assert shown(h2) == ["241.0.0.0/8"]


def test_up_all_down_all_down_every(lab, tmp_path):
    conf1, conf2 = tmp_path / "h1", tmp_path / "h2"
    for conf, addr in ((conf1, H1), (conf2, H2)):
        conf.write_text(f"241.0.0.0/8 {addr}/16\n10.0.0.0/8 {addr}/16 bridge fb10\n"
                        f"100.64.0.0/10 {addr}/16 off\n")
    # h1 runs a fan from its command line; h2 runs its file
    h1, h2 = hosts(lab, ["-o", "250.0.0.0/8", "-u", f"{H1}/16"], ["-c", str(conf2)])
    ok(h2, "up", "-o", "250.0.0.0/8", "-u", f"{H2}/16")
    ok(h1, "up", "-a", "-c", str(conf1))
    assert shown(h1) == ["250.0.0.0/8", "241.0.0.0/8", "10.0.0.0/8"]   # not the 'off' one
    for dst in ("250.2.1.1", "241.2.1.1", "10.2.1.1"):
        assert ping(h1, dst).returncode == 0, dst
    ok(h1, "up", "-a", "-c", str(conf1))                 # again: nothing to do
    ok(h1, "down", "-a", "-c", str(conf1))
    assert shown(h1) == ["250.0.0.0/8"]
    assert nsx(h1, "ip", "link", "show", "fb10", check=False).returncode != 0
    assert ping(h1, "250.2.1.1").returncode == 0

    ok(h2, "down", "-e")                                 # every fan; the forwarder stays
    assert shown(h2) == []
    assert "fan-" not in nsx(h2, "ip", "link").stdout
    assert ping(h1, "250.2.1.1", count=1).returncode != 0
    ok(h2, "up", "-a")                                   # -a: the forwarder's own -c file
    assert shown(h2) == ["241.0.0.0/8", "10.0.0.0/8"]
    ok(h1, "up", "-a", "-c", str(conf1))
    assert ping(h2, "241.1.1.1").returncode == 0
    assert lab.stop(lab.procs[1]) == 0
    assert not os.path.exists(control_path(h2))          # removed with the rest


def test_sighup_makes_the_running_fans_the_files_again(lab, tmp_path):
    """The file is the persistent truth: a reload undoes runtime ups and downs, and keeps
    the fans both agree on forwarding."""
    conf = tmp_path / "fan"
    conf.write_text(f"241.0.0.0/8 {H1}/16\n250.0.0.0/8 {H1}/16\n")
    h1, h2 = hosts(lab, ["-c", str(conf)], [*FAN, "-u", f"{H2}/16"])
    p1 = lab.procs[0]
    ok(h1, "up", "-o", "10.0.0.0/8", "-u", f"{H1}/16")
    ok(h1, "down", "-o", "250.0.0.0/8")
    assert shown(h1) == ["241.0.0.0/8", "10.0.0.0/8"]
    busy = flood(h1, "241.2.1.1")
    p1.send_signal(signal.SIGHUP)
    poll(lambda: shown(h1) == ["241.0.0.0/8", "250.0.0.0/8"], "the reload did not restore "
         "the file's fans")
    lossless(busy)


def test_refusals_keep_their_exit_statuses(lab):
    h1, _ = hosts(lab)
    nsx(h1, "ip", "link", "add", "fan-10", "type", "bridge")
    for args, status, message in [
        (["up", *FAN, "-u", f"{H1}/16", "nat"], 2, "already up with other settings"),
        (["up", "-o", "241.128.0.0/9", "-u", f"{H1}/16"], 2, "overlaps"),
        (["up", "-o", "10.0.0.0/8", "-u", f"{H1}/16", "bogus"], 2, "unknown flag 'bogus'"),
        (["up", "-o", "10.0.0.0/8", "-u", "172.16.7.7/16"], 5, "not configured on this host"),
        (["up", "-o", "10.0.0.0/8", "-u", f"{H1}/16"], 4, "device fan-10 already exists"),
        (["up", "-o", "10.0.0.0/8"], 2, "give both"),
        (["up", "-a", "-c", "/nonexistent/fan"], 2, "cannot read /nonexistent/fan"),
        (["down", "-o", "10.0.0.0/8"], 2, "no running fan has overlay 10.0.0.0/8"),
        (["down", *FAN, "-u", "172.16.2.1/16"], 2, "no running fan has overlay"),
        (["down", "-e", "-a"], 2, "take no fan"),
        (["down"], 2, "use -o OVERLAY"),
    ]:
        r = fanpkt(h1, *args)
        assert r.returncode == status and message in r.stderr, (args, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert shown(h1) == ["241.0.0.0/8"]                 # nothing changed, still forwarding
    assert ping(h1, "241.2.1.1").returncode == 0


def test_no_forwarder_says_how_to_start_one(lab):
    h1 = lab.host("h1", H1)
    for args in (["up", *FAN, "-u", f"{H1}/16"], ["down", "-e"], ["up", "-a"]):
        r = fanpkt(h1, *args)
        assert r.returncode == 6, r.stderr
        assert r.stderr.startswith("fanpkt: no fanpkt-forward is running in this network "
                                   "namespace; start one with `fanpkt-forward -c ")
    # a forwarder killed with -9 leaves its socket: still "not running", and the next
    # forwarder takes the path over
    p = lab.forward(h1, *FAN, "-u", f"{H1}/16")
    p.kill()
    p.wait()
    assert os.path.exists(control_path(h1))
    assert fanpkt(h1, "down", "-e").returncode == 6
    lab.forward(h1, *FAN, "-u", f"{H1}/16")
    ok(h1, "down", "-e")
    assert shown(h1) == []


def test_a_fan_show_lists_is_one_up_and_down_can_reach(lab, tmp_path):
    """`fanpkt show` lists each fan as soon as it is up, while the rest still come up; a
    script that waits for show and then runs `fanpkt up` must reach the forwarder."""
    conf = tmp_path / "fan"
    conf.write_text("".join(f"{o}.0.0.0/8 {H1}/16 bridge fb{o}\n"
                            for o in (241, 10, 250, 251, 252, 253)))
    h1 = lab.host("h1", H1)
    p = lab.forward(h1, "-c", str(conf), wait=False)
    poll(lambda: fanpkt(h1, "show").stdout.count("\n") > 1, what="a fan listed")
    assert os.path.exists(control_path(h1))
    ok(h1, "up", "-o", "254.0.0.0/8", "-u", f"{H1}/16")     # answered once serve() runs
    assert p.poll() is None
    assert "254.0.0.0/8" in shown(h1) and len(shown(h1)) == 7


def as_nobody(ns, cap, *args):
    """`fanpkt ARGS` as uid 65534 keeping one capability: dac_read_search to reach the
    interpreter (under a root-only home) and read the package, dac_override to get past
    the socket file's mode 0600 as well."""
    return nsx(ns, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
               f"--inh-caps=+{cap}", f"--ambient-caps=+{cap}", *FANPKT, *args,
               check=False, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_non_root_peers_are_refused(lab):
    h1, _ = hosts(lab)
    st = os.stat(control_path(h1))
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
    r = as_nobody(h1, "dac_read_search", "down", "-e")   # the file's mode stops it
    assert r.returncode == 3 and "must run as root" in r.stderr, r.stderr
    r = as_nobody(h1, "dac_override", "down", "-e")      # SO_PEERCRED stops it
    assert r.returncode == 3, r.stderr
    assert r.stderr == "fanpkt: the control socket is root's only (you are uid 65534)\n"
    assert "refused pid" in open(lab.logs[h1]).read()
    assert shown(h1) == ["241.0.0.0/8"]
    assert ping(h1, "241.2.1.1").returncode == 0


def exchange(path, data: bytes, shut=True, timeout=10) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(4096):
            got += chunk
        return json.loads(got)
    finally:
        s.close()


def test_hostile_clients_get_errors_and_never_stop_the_forwarder(lab):
    h1, _ = hosts(lab)
    path = control_path(h1)
    busy = flood(h1, "241.2.1.1", count=500)
    for data in [b"garbage\n", b"\xff\xfe\x00\n", b"[]\n", b"\n", b"{}\n", b"null\n",
                 b'{"op": "explode", "every": true}\n', b'{"op": "up", "fans": "x"}\n',
                 b'{"op": "up", "fans": [[1, 2]]}\n', b'{"op": "up", "fans": []}\n',
                 b'{"op": "up", "fans": [["241.0.0.0/8"]]}\n',
                 b'{"op": "down", "fans": [["a", "b", "c"]]}\n',
                 b'{"op": "up", "every": true}\n', b'{"op": "down", "every": 1}\n',
                 b'{"op": "down", "every": true, "all": true}\n',
                 b'{"op": "down", "every": true, "x": 1}\n',
                 b'{"op": "up", "all": true, "config": 7}\n',
                 b'{"op": "up", "fans": [["' + b"9" * 300 + b'", "x"]]}\n',
                 b'{"op": "down", "ev',                # cut short by the client's EOF
                 b"[" * 60000 + b"\n"]:                # deeper than Python's parser goes
        reply = exchange(path, data)
        assert reply["ok"] is False and reply["status"] == 2, (data[:40], reply)
        assert reply["error"].startswith("bad request"), reply
    # more than MAX_REQUEST bytes without a newline: refused once one byte too many came
    reply = exchange(path, b"x" * (64 * 1024 + 1), shut=False)
    assert reply["status"] == 2 and "over 65536 bytes" in reply["error"]
    # clients that say nothing hold no one up: an operator's command runs meanwhile,
    # the silent ones are answered after REQUEST_TIMEOUT, the surplus at once
    idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(6)]
    try:
        for s in idle:
            s.settimeout(10)
            s.connect(path)
        replies = [json.loads(s.makefile("rb").readline()) for s in idle]
    finally:
        for s in idle:
            s.close()
    assert sorted(r["error"][:13] for r in replies) == \
        ["bad request: "] * 4 + ["busy: too man"] * 2, replies
    assert {r["error"] for r in replies[:4]} == {"bad request: none complete within 2 s"}
    ok(h1, "up", "-o", "10.0.0.0/8", "-u", f"{H1}/16")  # a slot is free again
    lossless(busy)
    assert lab.procs[0].poll() is None
    assert shown(h1) == ["241.0.0.0/8", "10.0.0.0/8"]
    assert "Traceback" not in open(lab.logs[h1]).read()


# -- a failed change leaves everything as it was ---------------------------------------
def snapshot(ns, pid) -> dict:
    """What a failed `fanpkt up` must not change: the fans `fanpkt show` lists, the
    namespace's devices and addresses, the nft ruleset and the forwarder's threads."""
    threads = sorted(open(f"/proc/{pid}/task/{t}/comm").read().strip()
                     for t in os.listdir(f"/proc/{pid}/task"))
    return {"show": ok(ns, "show").stdout,
            "links": sorted(line.split(":")[1].split("@")[0].strip() for line in
                            nsx(ns, "ip", "-o", "link").stdout.splitlines()),
            "addrs": nsx(ns, "ip", "-o", "-4", "addr").stdout,
            "nft": nsx(ns, "nft", "list", "ruleset").stdout, "threads": threads}


FAKE_NFT = """#!/bin/sh
# nft that refuses while the flag file exists
[ -e "{flag}" ] && {{ echo "Error: Could not process rule: refused by the test" >&2; exit 1; }}
exec {nft} "$@"
"""


def test_a_failed_up_leaves_nothing_and_a_retry_really_retries(lab, tmp_path):
    """Each point where bringing a fan up can fail - its UDP port held by a kernel vxlan,
    nft refusing the new rules, an underlay MTU too small - leaves `fanpkt show`, the
    devices, the addresses, the rules and the threads exactly as they were; once the
    cause is gone, the same `fanpkt up` brings the fan up."""
    fake = tmp_path / "bin"
    fake.mkdir()
    flag = tmp_path / "refuse"
    (fake / "nft").write_text(FAKE_NFT.format(flag=flag, nft="/usr/sbin/nft"))
    (fake / "nft").chmod(0o755)
    h1 = lab.host("h1", H1)
    p = lab.forward(h1, *FAN, "-u", f"{H1}/16",
                    env={"PATH": f"{fake}:{os.environ['PATH']}"})
    # an interface whose MTU leaves an IPIP overlay less than 68
    nsx(h1, "ip", "link", "add", "small", "mtu", "80", "type", "veth", "peer", "name", "s1")
    nsx(h1, "ip", "addr", "add", "192.168.5.1/24", "dev", "small")
    nsx(h1, "ip", "link", "set", "small", "up")

    def fails(args, message):
        before = snapshot(h1, p.pid)
        r = fanpkt(h1, "up", *args)
        assert r.returncode != 0 and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
        assert snapshot(h1, p.pid) == before

    # the userspace engine's UDP sockets and loops (a VXLAN fan takes the kernel path by
    # default; its fallbacks are tests/test_kernelpath.py's)
    vx = ["-o", "250.0.0.0/8", "-u", f"{H1}/16", "--type", "vxlan", "--port", "4789",
          "--datapath", "user"]
    nsx(h1, "ip", "link", "add", "kvx", "type", "vxlan", "id", "9", "dstport", "4789",
        "dev", "eth0")
    nsx(h1, "ip", "link", "set", "kvx", "up")               # its socket holds 4789
    fails(vx, "UDP port 4789 is taken")
    fails(vx, "UDP port 4789 is taken")                     # still: nothing left over
    nsx(h1, "ip", "link", "del", "kvx")
    ok(h1, "up", *vx)                                       # a retry really retries
    assert shown(h1) == ["241.0.0.0/8", "250.0.0.0/8"]
    threads = snapshot(h1, p.pid)["threads"]
    assert "fanpkt-tx-250" in threads and "fanpkt-rxv-4789" in threads

    flag.write_text("")
    fails(["-o", "10.0.0.0/8", "-u", f"{H1}/16", "nat"], "nft refused")
    fails(["-o", "240.0.0.0/8", "-u", f"{H1}/16", "--type", "vxlan", "--port", "4790",
           "--datapath", "user"], "nft refused")            # a new port's loop, undone
    flag.unlink()
    ok(h1, "up", "-o", "10.0.0.0/8", "-u", f"{H1}/16", "nat")
    assert "snat to 172.16.1.1" in nsx(h1, "nft", "list", "ruleset").stdout

    fails(["-o", "100.64.0.0/10", "-u", "192.168.5.1/24"], "MTU 80")
    assert shown(h1) == ["241.0.0.0/8", "250.0.0.0/8", "10.0.0.0/8"]
    assert p.poll() is None


def test_a_failed_reload_leaves_nothing_and_the_next_one_repairs(lab, tmp_path):
    """SIGHUP with a file that adds a fan whose port is held: the running fans stay, the
    new one is not half up; the next SIGHUP, once the port is free, brings it up. The
    fan is on the userspace engine, whose UDP socket and loops this watches."""
    conf = tmp_path / "fan"
    conf.write_text(f"241.0.0.0/8 {H1}/16\n")
    h1 = lab.host("h1", H1)
    p = lab.forward(h1, "-c", str(conf))
    nsx(h1, "ip", "link", "add", "kvx", "type", "vxlan", "id", "9", "dstport", "4789",
        "dev", "eth0")
    nsx(h1, "ip", "link", "set", "kvx", "up")
    before = snapshot(h1, p.pid)
    conf.write_text(f"241.0.0.0/8 {H1}/16\n250.0.0.0/8 {H1}/16 type vxlan port 4789 "
                    "datapath user\n")
    log_size = os.path.getsize(lab.logs[h1])
    p.send_signal(signal.SIGHUP)
    poll(lambda: "cannot bring up 250.0.0.0/8" in open(lab.logs[h1]).read()[log_size:],
         "the reload did not report the fan it could not bring up")
    assert snapshot(h1, p.pid) == before
    nsx(h1, "ip", "link", "del", "kvx")
    p.send_signal(signal.SIGHUP)
    poll(lambda: shown(h1) == ["241.0.0.0/8", "250.0.0.0/8"]
         and "fanpkt-tx-250" in snapshot(h1, p.pid)["threads"],
         "the next reload did not bring the fan up")


@pytest.mark.parametrize("datapath", ["user", "kernel"])
def test_an_underlay_address_on_lo_takes_the_routes_mtu(lab, datapath):
    """A routed host's /32 on lo: the underlay MTU is the route's toward the underlay
    (here 1400 on eth0), not lo's 65536; the fan comes up, forwarding and `fanpkt up`
    alike, and carries traffic, on either data path (on the kernel path, the ARP replies
    to requests from the fan leave from the fan's address, not the route's)."""
    h1 = lab.host("h1", H1)
    h2 = lab.host("h2", H2)
    for ns, addr in ((h1, "172.17.1.1"), (h2, "172.17.2.1")):
        nsx(ns, "ip", "addr", "add", f"{addr}/32", "dev", "lo")
        nsx(ns, "ip", "route", "add", "172.17.0.0/16", "dev", "eth0", "mtu", "1400")
    lab.forward(h1, *FAN, "-u", "172.17.1.1/16")
    lab.forward(h2, *FAN, "-u", "172.17.2.1/16")
    assert nsx(h1, "cat", "/sys/class/net/fan-241/mtu").stdout.strip() == "1380"
    ok(h1, "up", "-o", "10.0.0.0/8", "-u", "172.17.1.1/16", "--type", "vxlan",
       "--datapath", datapath)
    assert nsx(h1, "cat", "/sys/class/net/fanbr-10/mtu").stdout.strip() == "1350"
    ok(h2, "up", "-o", "10.0.0.0/8", "-u", "172.17.2.1/16", "--type", "vxlan",
       "--datapath", datapath)
    assert ping(h1, "241.2.1.1").returncode == 0
    assert ping(h1, "10.2.1.1").returncode == 0
    nsx(h1, "ip", "route", "del", "172.17.0.0/16")          # no way out: a clear refusal
    r = fanpkt(h1, "up", "-o", "250.0.0.0/8", "-u", "172.17.1.1/16")
    assert r.returncode == 5 and "on the loopback and no route" in r.stderr, r.stderr
    assert shown(h1) == ["241.0.0.0/8", "10.0.0.0/8"]
