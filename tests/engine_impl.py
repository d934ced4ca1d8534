"""The compiled engine behind the oracle's interface, so tests run against either."""
from __future__ import annotations

from fanpkt.fanmap import FanMap
from fanpkt.native import COUNTER_NAMES, engine_row, fastpath, new_counters


class EngineImpl:
    def __init__(self, maps: list[FanMap], mtu: int = 1500, check_spoof: bool = True):
        self.engine = fastpath.Engine([engine_row(m, mtu) for m in maps], check_spoof)
        self.counters = new_counters()
        self.ip_id = 0

    def encap(self, pkt: bytes):
        v, reason, out, dst = fastpath.encap(self.engine, pkt, self.counters, self.ip_id)
        self.ip_id = (self.ip_id + (1 if v.name in ("VERDICT_SEND", "VERDICT_ICMP") else 0)) & 0xFFFF
        return v.name, COUNTER_NAMES[reason].upper() if reason >= 0 else None, out, dst

    def decap(self, d: bytes):
        v, reason, inner, idx = fastpath.decap(self.engine, d, self.counters)
        return v.name, COUNTER_NAMES[reason].upper() if reason >= 0 else None, inner, idx

    def counter(self, name: str) -> int:
        return int(self.counters[COUNTER_NAMES.index(name.lower())])
