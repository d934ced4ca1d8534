"""What a running forwarder publishes (fanpkt/runstate.py): state.json, the lock that says
it is running, a crashed run's leftovers, and the live counter file."""
from __future__ import annotations

import fcntl
import json
import os
import stat
import threading

import pytest

from fanpkt import runstate
from fanpkt.errors import AlreadyRunning, ConfigError, NotRunning
from fanpkt.runstate import (RX_BLOCK, FanState, RunState, State, netns_dir, tx_block,
                             vxlan_rx_block)

NAMES = ["tx_packets", "drop_tx_no_map", "rx_packets"]
BLOCK = 4                   # one entry more than NAMES: a block may be padded


def fan(device="fan-241", bridge="fanbr0", flags=("dhcp", "bridge fanbr0")):
    return FanState(device=device, bridge=bridge, overlay="241.0.0.0/8",
                    underlay="172.16.3.4/16", slice="241.3.4.0/24", flags=list(flags),
                    mtu=1480, plumbing={"gateway": "241.3.4.1", "bridge": bridge})


def state(pid=None, **kw) -> State:
    """A state as this test process would publish it, were it the forwarder."""
    kw.setdefault("fans", [fan(), fan("fan-10", None, ())])
    kw.setdefault("started", runstate.process_start(os.getpid()) if pid is None else 0)
    return State(pid=os.getpid() if pid is None else pid, config="/etc/network/fan",
                 check_spoof=True, ip_forward_before="0", counter_names=NAMES,
                 counter_block=BLOCK, counter_blocks={"rx": RX_BLOCK, "tx:fan-241": tx_block(0),
                                                      "tx:fan-10": tx_block(1)}, **kw)


@pytest.fixture
def run(tmp_path):
    """A forwarder's RunState, released after the test whatever happened."""
    rs = RunState(str(tmp_path / "net-1"))
    yield rs
    rs.release()


def test_state_json_round_trip():
    s = state()
    d = json.loads(json.dumps(s.to_json()))        # as written to and read from state.json
    assert d["fans"][1]["bridge"] is None and d["counter_blocks"]["tx:fan-10"] == tx_block(1)
    back = State.from_json(d)
    assert back == s and isinstance(back.fans[0], FanState)
    assert isinstance(d["fans"][0], dict)           # the caller's dict is left as it was
    assert State.from_json(state(fans=[]).to_json()) == state(fans=[])


def test_blocks_and_directory():
    # IPIP receive; the transmit loops, 8 queues per fan slot; the VXLAN ports' receive
    # loops, 8 per port: every block distinct, the file holds them all
    blocks = [RX_BLOCK] + [tx_block(s, q) for s in range(16) for q in range(8)] + \
        [vxlan_rx_block(k, q) for k in range(16) for q in range(8)] + \
        [runstate.rx_block(q) for q in range(1, 8)]
    assert runstate.rx_block(0) == RX_BLOCK
    assert blocks == list(range(runstate.N_BLOCKS)) and (tx_block(0), tx_block(0, 1)) == (1, 2)
    ino = os.stat("/proc/self/ns/net").st_ino
    assert netns_dir("/x") == f"/x/net-{ino}"
    assert RunState.find().path == netns_dir() == f"/run/fanpkt/net-{ino}"
    assert RunState.find("/tmp/elsewhere").path == "/tmp/elsewhere"


def test_acquire_takes_the_lock(run):
    assert not os.path.exists(run.path)
    assert run.acquire() is None                    # no crashed predecessor
    assert os.path.isdir(run.path) and os.path.exists(run.file("lock"))
    assert not RunState(run.path).is_running()      # listed only once it publishes
    run.write_state(state())
    assert RunState(run.path).is_running()
    second = RunState(run.path)
    with pytest.raises(AlreadyRunning, match=rf"already running .*\(pid {os.getpid()}\)") as e:
        second.acquire()
    assert e.value.exit_status == 7 and second.lock_fd is None
    assert RunState(run.path).read_state() == state()      # the first one's, untouched
    run.release()
    assert not RunState(run.path).is_running()
    assert second.acquire() is None                 # free again once the first let go
    second.release()


def test_crashed_run_leaves_its_state_for_the_next(run):
    crashed = RunState(run.path)
    crashed.acquire()
    crashed.write_state(state(pid=999999))
    os.close(crashed.lock_fd)                       # died without release(): lock gone
    with pytest.raises(NotRunning):                 # its state.json alone is no forwarder
        RunState(run.path).read_state()
    left = run.acquire()
    assert left == state(pid=999999)
    assert not os.path.exists(run.file("state.json"))  # not listed as running meanwhile
    assert os.path.exists(run.file("leftover.json"))
    with pytest.raises(NotRunning):
        RunState(run.path).read_state()
    run.forget_leftovers()
    assert not os.path.exists(run.file("leftover.json"))
    run.forget_leftovers()                          # twice is harmless
    run.write_state(state())
    assert RunState(run.path).read_state() == state()


def test_counters_are_live_and_summed_per_name(run):
    run.acquire()
    c = run.create_counters(runstate.N_BLOCKS, BLOCK)
    assert os.path.getsize(run.file("counters")) == runstate.N_BLOCKS * BLOCK * 8
    assert [list(c.block(i)) for i in range(runstate.N_BLOCKS)] == \
        [[0] * BLOCK] * runstate.N_BLOCKS
    run.write_state(state())
    c.block(RX_BLOCK)[2] = 7                        # rx_packets
    c.block(RX_BLOCK)[0] = 100                      # an rx loop's tx_packets: still summed
    c.block(tx_block(0))[0] = 5
    c.block(tx_block(0))[1] = 2
    c.block(tx_block(1))[0] = 11
    c.block(tx_block(1))[3] = 12345                 # padding: no name, never reported
    snap = RunState(run.path).read_counters()       # a reader: `fanpkt stats`
    assert snap["pid"] == os.getpid()
    assert snap["total"] == {"tx_packets": 116, "drop_tx_no_map": 2, "rx_packets": 7}
    assert snap["loops"] == {
        "rx": {"tx_packets": 100, "drop_tx_no_map": 0, "rx_packets": 7},
        "tx:fan-241": {"tx_packets": 5, "drop_tx_no_map": 2, "rx_packets": 0},
        "tx:fan-10": {"tx_packets": 11, "drop_tx_no_map": 0, "rx_packets": 0}}
    c.block(tx_block(0))[0] += 1                    # live: no write_state needed
    assert RunState(run.path).read_counters()["total"]["tx_packets"] == 117


def test_zero_clears_one_block(run):
    run.acquire()
    c = run.create_counters(runstate.N_BLOCKS, BLOCK)
    for i in range(3):
        for k in range(BLOCK):
            c.block(i)[k] = 10 * i + k + 1
    c.zero(1)
    assert [list(c.block(i)) for i in range(3)] == [[1, 2, 3, 4], [0, 0, 0, 0],
                                                    [21, 22, 23, 24]]


def test_release_removes_everything(run):
    run.acquire()
    c = run.create_counters(2, BLOCK)
    loop_view = c.block(tx_block(0))                # a loop still holding its block
    run.write_state(state())
    run.release()
    assert not os.path.exists(run.path)
    assert run.lock_fd is None and run.counters is None
    loop_view[0] = 1                                # the mapping lives as long as the view
    run.release()                                   # twice is harmless
    assert not os.path.exists(run.path)


def test_release_keeps_a_leftover_until_forgotten(run):
    crashed = RunState(run.path)
    crashed.acquire()
    crashed.write_state(state(pid=999999))
    os.close(crashed.lock_fd)
    assert run.acquire() is not None
    run.release()
    # the crashed run's record was not cleaned up: it stays for the next start
    assert os.listdir(run.path) == ["leftover.json"]
    nxt = RunState(run.path)
    assert nxt.acquire() == state(pid=999999)
    nxt.release()


def test_readers_take_no_lock_and_know_a_dead_pid_from_a_reused_one(run):
    """`fanpkt show`/`stats` never lock (a reader's lock could keep a start out): the pid
    and start time in state.json say whether the forwarder lives. After a crash the pid
    may belong to another process by now; its start time differs."""
    run.acquire()
    run.create_counters(vxlan_rx_block(16), BLOCK)
    run.write_state(state())
    real_flock = fcntl.flock
    try:
        fcntl.flock = lambda *a: pytest.fail("a reader took a lock")
        assert RunState(run.path).read_state() == state()
        assert "total" in RunState(run.path).read_counters()
    finally:
        fcntl.flock = real_flock
    other = state(pid=1, started=runstate.process_start(1) + 1)     # pid 1, not its start
    run.write_state(other)
    with pytest.raises(NotRunning):
        RunState(run.path).read_state()
    run.write_state(state(pid=2 ** 22 + 1))                         # no such process
    assert not RunState(run.path).is_running()


def test_no_forwarder_is_not_running(tmp_path):
    for path in (tmp_path / "missing", tmp_path):    # no directory; a directory, no lock
        rs = RunState(str(path))
        assert not rs.is_running()
        with pytest.raises(NotRunning, match="no fanpkt-forward is running") as e:
            rs.read_state()
        assert e.value.exit_status == 6
        with pytest.raises(NotRunning):
            rs.read_counters()
    (tmp_path / "lock").touch()                      # a lock nobody holds
    with pytest.raises(NotRunning):
        RunState(str(tmp_path)).read_state()


def test_the_lock_is_root_only(run):
    """A user who could open the lock could hold it shared after a crash and keep every
    start out (exit 7, which systemd does not retry)."""
    os.makedirs(run.path)
    with open(run.file("lock"), "w"):
        os.chmod(run.file("lock"), 0o644)              # as an older fanpkt left it
    run.acquire()
    assert stat.S_IMODE(os.stat(run.file("lock")).st_mode) == 0o600
    run.release()


def test_a_readers_brief_lock_does_not_fail_a_start(run):
    os.makedirs(run.path)
    fd = os.open(run.file("lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)                     # `fanpkt show` at that moment
    threading.Timer(0.03, os.close, (fd,)).start()
    assert run.acquire() is None
    run.release()


def test_a_lock_on_an_unlinked_file_is_no_lock(run, monkeypatch):
    """Between open and flock a stopping forwarder may unlink the lock file and another
    start create a new one: holding the old file's lock, this one must try again."""
    os.makedirs(run.path)
    real = fcntl.flock
    calls = []

    def flock(fd, op):
        real(fd, op)
        if not calls:                                  # the first time only
            os.unlink(run.file("lock"))
            os.close(os.open(run.file("lock"), os.O_CREAT | os.O_RDWR, 0o600))
        calls.append(fd)
    monkeypatch.setattr(runstate.fcntl, "flock", flock)
    run.acquire()
    assert len(calls) == 2
    assert os.path.samestat(os.fstat(run.lock_fd), os.stat(run.file("lock")))
    run.release()


@pytest.mark.parametrize("make", ["world-writable", "symlinked-dir", "symlinked-lock"])
def test_a_run_directory_others_control_is_refused(tmp_path, make):
    """Root deletes what a leftover record there names: a directory others can write, or
    a symlink anywhere in it, is a clear error and nothing is followed."""
    path = tmp_path / "run"
    if make == "world-writable":
        path.mkdir()
        path.chmod(0o777)
    elif make == "symlinked-dir":
        (tmp_path / "real").mkdir()
        path.symlink_to(tmp_path / "real")
    else:
        path.mkdir(mode=0o755)
        (path / "lock").symlink_to(tmp_path / "target")
    with pytest.raises(ConfigError) as e:
        RunState(str(path)).acquire()
    assert e.value.exit_status == 2 and str(path) in str(e.value)
    assert not (tmp_path / "target").exists()


def test_which_fans_each_loop_counts_for(run):
    """A transmit loop its fan; the IPIP receive loop every IPIP fan; a VXLAN port's
    receive loop the VXLAN fans on that port (state.json names each VXLAN fan's port)."""
    vx = [FanState(device=d, bridge=None, overlay="240.0.0.0/8", underlay="172.16.3.4/16",
                   slice="240.3.4.0/24", flags=[], mtu=1450, plumbing={}, type="vxlan",
                   port=p) for d, p in (("fan-240", 8472), ("fan-239", 4789), ("fan-238", 8472))]
    s = state(fans=[fan(), fan("fan-10", None, ()), *vx])
    s.counter_blocks.update({"rx-vxlan:8472": 17, "rx-vxlan:4789": 18})
    assert runstate.loop_fans(s) == {
        "rx": ["fan-241", "fan-10"], "tx:fan-241": ["fan-241"], "tx:fan-10": ["fan-10"],
        "rx-vxlan:8472": ["fan-240", "fan-238"], "rx-vxlan:4789": ["fan-239"]}
    assert State.from_json(json.loads(json.dumps(s.to_json()))).fans[3].port == 4789
    run.acquire()
    run.create_counters(19, BLOCK)
    run.write_state(s)
    assert RunState(run.path).read_counters()["loop_fans"] == runstate.loop_fans(s)


def test_the_forwarders_own_snapshot_is_what_readers_read(run):
    run.acquire()
    assert run.snapshot() is None                   # nothing published yet
    c = run.create_counters(runstate.N_BLOCKS, BLOCK)
    run.write_state(state())
    c.block(tx_block(1))[0] = 11
    c.block(RX_BLOCK)[2] = 7
    assert run.snapshot() == RunState(run.path).read_counters()
    assert run.snapshot()["loops"]["tx:fan-10"]["tx_packets"] == 11
    run.release()
    assert run.snapshot() is None


def test_a_forwarder_stopping_between_the_two_reads_is_not_running(run, monkeypatch):
    run.acquire()
    run.create_counters(runstate.N_BLOCKS, BLOCK)
    run.write_state(state())
    reader = RunState(run.path)
    read_state = reader.read_state

    def then_stop():
        s = read_state()
        os.unlink(run.file("counters"))             # as release() does, first
        return s
    monkeypatch.setattr(reader, "read_state", then_stop)
    with pytest.raises(NotRunning):
        reader.read_counters()
