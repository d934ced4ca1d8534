"""fanpkt/counters.py: every counter's kind from its name, a snapshot per fan and
direction, and the rates between two snapshots (pure functions, exact values)."""
from __future__ import annotations

import pytest

from fanpkt import counters
from fanpkt.counters import BYTES, DROPPED, PACKETS, PATH, Kind, Rate
from fanpkt.engine import COUNTER_NAMES


def test_every_counter_has_a_direction_and_a_kind():
    kinds = {n: counters.kind(n) for n in COUNTER_NAMES}
    assert kinds["tx_packets"] == Kind("tx", PACKETS)
    assert kinds["rx_bytes"] == Kind("rx", BYTES)
    assert kinds["drop_rx_spoofed_src"] == Kind("rx", DROPPED, "spoofed_src")
    assert kinds["drop_tx_no_map"] == Kind("tx", DROPPED, "no_map")
    assert kinds["tx_gso_fallback"] == Kind("tx", PATH)
    assert kinds["rx_ecn_ce"] == Kind("rx", PATH)
    # one packets and one bytes counter per direction; every drop_ name is a drop
    for d in ("tx", "rx"):
        assert [n for n, k in kinds.items() if k == Kind(d, PACKETS)] == [f"{d}_packets"]
        assert [n for n, k in kinds.items() if k == Kind(d, BYTES)] == [f"{d}_bytes"]
    assert {n for n, k in kinds.items() if k.family == DROPPED} == \
        {n for n in COUNTER_NAMES if n.startswith("drop_")}
    for n, k in kinds.items():     # the name is rebuilt from its kind: nothing is lost
        assert n == (f"drop_{k.direction}_{k.reason}" if k.family == DROPPED
                     else f"{k.direction}_{n.split('_', 1)[1]}")


@pytest.mark.parametrize("name", ["drops_total", "drop_xx_y", "tx", "drop_tx", "packets"])
def test_a_name_without_a_direction_is_refused(name):
    with pytest.raises(ValueError):
        counters.kind(name)


def snap(pid=1, rx=(0, 0, 0), tx241=(0, 0, 0), tx10=(0, 0, 0), vx=(0, 0, 0),
         ipip=("fan-10", "fan-241")):
    """A snapshot as runstate.totals() makes it: (packets, bytes, one drop) per loop."""
    def block(d, p, b, x):
        other = "rx" if d == "tx" else "tx"
        return {f"{d}_packets": p, f"{d}_bytes": b, f"drop_{d}_malformed" if d == "tx"
                else f"drop_{d}_not_local": x, f"{d}_l2" if d == "tx" else f"{d}_ecn_ce": 5,
                f"{other}_packets": 0}
    return {"pid": pid,
            "loops": {"rx": block("rx", *rx), "tx:fan-241": block("tx", *tx241),
                      "tx:fan-10": block("tx", *tx10), "rx-vxlan:8472": block("rx", *vx)},
            "loop_fans": {"rx": list(ipip), "tx:fan-241": ["fan-241"],
                          "tx:fan-10": ["fan-10"], "rx-vxlan:8472": ["fan-240"]}}


def test_by_fan_takes_each_loops_own_direction_under_its_fans():
    got = counters.by_fan(snap(rx=(7, 700, 1), tx241=(3, 300, 2), vx=(9, 900, 0)))
    assert set(got) == {("fan-10,fan-241", "rx"), ("fan-241", "tx"), ("fan-10", "tx"),
                        ("fan-240", "rx")}
    assert got[("fan-10,fan-241", "rx")] == {"rx_packets": 7, "rx_bytes": 700,
                                              "drop_rx_not_local": 1, "rx_ecn_ce": 5}
    assert got[("fan-241", "tx")] == {"tx_packets": 3, "tx_bytes": 300,
                                      "drop_tx_malformed": 2, "tx_l2": 5}
    # a receive loop serving one fan is that fan's
    assert ("fan-241", "rx") in counters.by_fan(snap(ipip=["fan-241"]))


def test_rates_per_fan_and_direction():
    a = snap(rx=(10, 1000, 0), tx241=(100, 15000, 1), tx10=(5, 500, 0))
    b = snap(rx=(30, 4000, 4), tx241=(300, 45000, 3), tx10=(5, 500, 0))
    assert counters.rates(a, b, 2.0) == [
        Rate("fan-10", "tx", 0.0, 0.0, 0.0),
        Rate("fan-10,fan-241", "rx", 10.0, 1500.0, 2.0),
        Rate("fan-240", "rx", 0.0, 0.0, 0.0),
        Rate("fan-241", "tx", 100.0, 15000.0, 1.0)]


def test_rates_after_a_restart_a_new_loop_or_a_reused_block_count_from_zero():
    a = snap(tx241=(100, 15000, 1))
    # another forwarder (pid 2): everything it counted is new
    assert counters.rates(a, snap(pid=2, tx241=(4, 400, 0)), 1.0)[-1] == \
        Rate("fan-241", "tx", 4.0, 400.0, 0.0)
    # the fan's block was zeroed for a re-added fan: its counters went down
    assert counters.rates(a, snap(tx241=(6, 600, 0)), 1.0)[-1] == \
        Rate("fan-241", "tx", 6.0, 600.0, 0.0)
    # a loop missing from the first reading started at zero
    del a["loops"]["tx:fan-241"]
    assert counters.rates(a, snap(tx241=(8, 800, 1)), 2.0)[-1] == \
        Rate("fan-241", "tx", 4.0, 400.0, 0.5)
    # no first reading at all
    assert counters.rates(None, snap(tx241=(8, 800, 1)), 1.0)[-1] == \
        Rate("fan-241", "tx", 8.0, 800.0, 1.0)
