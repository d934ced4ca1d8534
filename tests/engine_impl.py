"""The compiled engine behind the oracle's interface, so tests run against either.

The outer IP ID is the engine's own sequence (the Harness keeps it as a transmit loop's
queue does): differential tests hold it to the oracle's, packet for packet."""
from __future__ import annotations

from fanpkt.engine import COUNTER_NAMES, MapRow, fastpath, new_counters
from fanpkt.fanmap import FanMap


class EngineImpl:
    def __init__(self, maps: list[FanMap], mtu: int = 1500, check_spoof: bool = True):
        self.engine = fastpath.Engine([MapRow.of(m, mtu) for m in maps], check_spoof)
        self.counters = new_counters()
        self.harness = fastpath.Harness(self.engine, self.counters)

    def encap(self, pkt: bytes):
        v, reason, out, dst = self.harness.encap(pkt)
        return v.name, COUNTER_NAMES[reason].upper() if reason >= 0 else None, out, dst

    def decap(self, d: bytes):
        v, reason, inner, idx = self.harness.decap(d)
        return v.name, COUNTER_NAMES[reason].upper() if reason >= 0 else None, inner, idx

    def counter(self, name: str) -> int:
        return int(self.counters[COUNTER_NAMES.index(name.lower())])
