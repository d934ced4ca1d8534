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


class VxlanEngineImpl:
    """The engine's VXLAN path behind VxlanOracle's interface."""

    def __init__(self, maps: list[FanMap], vnis: list[int], port: int = 8472,
                 dev_mac: bytes = b"\x02\xf1\x00\x00\x00\x01", seed: int = 1,
                 mtu: int = 1500, check_spoof: bool = True):
        rows = [MapRow.of(m, mtu, kind="vxlan", vni=v, port=port, dev_mac=dev_mac)
                for m, v in zip(maps, vnis)]
        self.engine = fastpath.Engine(rows, check_spoof, seed=seed)
        self.counters = new_counters()
        self.harness = fastpath.Harness(self.engine, self.counters)
        self._local_macs: set = set()

    @property
    def local_macs(self) -> set:
        return self._local_macs

    @local_macs.setter
    def local_macs(self, macs) -> None:
        self._local_macs = set(macs)
        self.engine.set_local_macs(self._local_macs)
        self.engine.retire()

    def encap(self, frame: bytes):
        v, reason, outs, dst = self.harness.transmit(bytes(10), frame, vxlan=True)
        out = b"".join(outs) if v.name == "VERDICT_SEND" and len(outs) == 1 else \
            (outs if v.name == "VERDICT_SEND" else b"")
        return v.name, COUNTER_NAMES[reason].upper() if reason >= 0 else None, out, dst

    def decap(self, payload: bytes, osrc: int, otos: int = 0, port: int = 8472,
              odst: int | None = None):
        v, reason, frame, idx = self.harness.vxlan_decap(payload, osrc, otos, port, odst)
        return v.name, COUNTER_NAMES[reason].upper() if reason >= 0 else None, frame, idx

    def counter(self, name: str) -> int:
        return int(self.counters[COUNTER_NAMES.index(name.lower())])
