"""The mutation fuzzer: seeded random and mutated input through every path of both fan
types, the compiled engine held to the oracle (tests/oracle.py), and hostile text through
the config and command-line parsers. tests/test_fuzz.py runs it in CI (on the release and
the FANPKT_DEBUG=1 build); `tools/fuzz.sh --seconds N` runs it for as long as asked.

Paths and what each compares (docs/spec.md §4, §6, docs/internals.md §3):
  decap        IPIP datagram: Harness.decap vs Oracle.decap (spoof check on or off)
  encap        IPIP TUN packet: Harness.encap vs Oracle.encap (outer IP IDs included)
  vxlan_decap  VXLAN UDP payload: Harness.vxlan_decap vs VxlanOracle.decap
  vxlan_encap  TAP frame: Harness.transmit(vxlan=True) vs VxlanOracle.encap
  transmit     a TUN or TAP read with a hostile virtio header (Harness.transmit). With an
               all-zero header: byte for byte the oracle's encap. With any other: no
               crash, outputs bounded in number (read length / 88 + 2) and size (the
               underlay MTU), each a well-formed outer IPv4 packet, one counted drop
               for a drop.
  receive      a burst of IPIP datagrams (TCP segment runs of several flows, mutated,
               interleaved with random datagrams) through Harness.receive (GRO); the
               oracle decapsulates each datagram on its own. The engine must write
               exactly the packets the oracle delivers: every single output is one of the
               oracle's packets byte for byte, segments merged are counted, and each
               connection's bytes (TCP payload, or whole packets) arrive in order.
  vxlan_receive  the same for VXLAN bursts through Harness.vxlan_receive (one datagram
               per buffer, or a UDP-GRO buffer of equal-sized datagrams), the TAP a
               socketpair.
Every path's packets are compared with the oracle (no sampling). After a run, each
harness's drop counters add up to the drops seen (counters sum = packets in).

Parsers: random and mutated /etc/network/fan lines (config.parse_lines) and argv of both
commands (cli.run with the forwarder and the kernel resolver stubbed): the result is a
parsed config, or a fanpkt.errors.FanError (one line, an exit status); any other
exception is a bug.

The seed is printed; FANPKT_FUZZ_SEED=<n> replays it.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import socket
import struct
import sys
import time

from fanpkt.engine import COUNTER_NAMES, MapRow, fastpath, new_counters
from fanpkt.errors import FanError

from engine_impl import EngineImpl, VxlanEngineImpl
from oracle import Oracle, VxlanOracle, checksum
from packets import mutate, vnet

# the differential tests' generators: random IPv4 packets, IPIP datagrams, VXLAN frames
from test_differential import MAPS_RX, MAPS_TX, outer_for, random_ipv4
from test_vxlan import MY_MAC, PEER_MAC, RX_MAPS as VX_RX_MAPS, TX_MAPS as VX_TX_MAPS, \
    VNIS, random_frame, whole

PATHS = ("decap", "encap", "vxlan_decap", "vxlan_encap", "transmit", "receive",
         "vxlan_receive")
MTU = 1500
TCP_MIN_MSS = 88
PEER_MAC_B, MY_MAC_B = (bytes.fromhex(m.replace(":", "")) for m in (PEER_MAC, MY_MAC))
SENDER, RECEIVER = 0xAC100304, 0xAC100607          # 172.16.3.4 -> 172.16.6.7


def seed_from_env() -> int:
    return int(os.environ.get("FANPKT_FUZZ_SEED", random.randrange(1 << 32)))


class Mismatch(AssertionError):
    pass


def drops(counters, prefix: str) -> int:
    return sum(int(counters[i]) for i, n in enumerate(COUNTER_NAMES) if n.startswith(prefix))


# -- input corpus ------------------------------------------------------------------------
def superpacket(src: int, dst: int, sport: int, seq: int, payload: bytes, eth: bytes = b"",
                flags: int = 0x10) -> bytes:
    """An option-less IPv4/TCP packet, DF set, checksums valid: what a TSO read holds
    (eth: an Ethernet header in front, for a TAP)."""
    tcp = struct.pack("!HHIIBBHHH", sport, 5201, seq, 7, 5 << 4, flags, 512, 0, 0)
    ip = struct.pack("!BBHHHBBHII", 0x45, 0, 40 + len(payload), 50, 0x4000, 64, 6, 0,
                     src, dst)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    pseudo = struct.pack("!IIBBH", src, dst, 0, 6, 20 + len(payload))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp + payload)) + tcp[18:]
    return eth + ip + tcp + payload


class Corpus:
    """Segment runs of TCP flows, as the sender's engine puts them on the wire (TSO split):
    the receive paths' GRO needs long valid runs, which random bytes never make."""

    def __init__(self, rng: random.Random):
        self.ipip: list[list[bytes]] = []           # IPIP datagrams, outer header first
        self.vxlan: list[list[bytes]] = []          # VXLAN UDP payloads
        ipip = fastpath.Harness(fastpath.Engine([MapRow.of(m) for m in MAPS_TX]),
                                new_counters())
        vx = fastpath.Harness(fastpath.Engine(
            [MapRow.of(m, kind="vxlan", vni=v, port=8472, dev_mac=PEER_MAC_B)
             for m, v in zip(VX_TX_MAPS, VNIS)], seed=5), new_counters())
        eth = MY_MAC_B + PEER_MAC_B + b"\x08\x00"
        for k in range(12):
            src, dst = rng.choice([(0xF1030409, 0xF1060708), (0xF103040A, 0xF1060709),
                                   (0x64475BC8 & ~0xFF | 9, 0x64400001 | 0x19 << 8)])
            mss = rng.choice([536, 1000, 1398, 1428])
            payload = rng.randbytes(mss * rng.randrange(2, 12) + rng.randrange(mss))
            sport = 4000 + k
            v, _, outs, _ = ipip.transmit(vnet(1, 1, 40, mss, 20, 16),
                                          superpacket(src, dst, sport, 1000, payload))
            if v.name == "VERDICT_SEND":
                self.ipip.append(outs)
            if (src >> 24) == 0xF1:
                v, _, outs, _ = vx.transmit(vnet(1, 1, 54, min(mss, 1398), 34, 16),
                                            superpacket(src, dst, sport, 1000, payload, eth),
                                            vxlan=True)
                if v.name == "VERDICT_SEND":
                    self.vxlan.append([o[28:] for o in outs])
        assert self.ipip and self.vxlan


# -- the fuzzer ------------------------------------------------------------------------
class Fuzzer:
    """One seeded run. step(path) feeds one input (or one burst) through a path and
    returns how many packets it was; a disagreement raises Mismatch naming the seed."""

    def __init__(self, seed: int):
        self.seed = seed
        self.rng = random.Random(seed)
        self.corpus = Corpus(random.Random(seed ^ 0x5A5A))
        self.packets = {p: 0 for p in PATHS}
        self.merged = {"receive": 0, "vxlan_receive": 0}    # superpackets GRO wrote
        self.outcomes: dict = {}
        # IPIP: one sender, receivers with the spoof check on and off
        self.tx = (Oracle(MAPS_TX), EngineImpl(MAPS_TX))
        self.rx = [(Oracle(MAPS_RX, check_spoof=c), EngineImpl(MAPS_RX, check_spoof=c))
                   for c in (True, False)]
        self.vtx = (VxlanOracle(VX_TX_MAPS, VNIS, seed=7), VxlanEngineImpl(VX_TX_MAPS, VNIS,
                                                                          seed=7))
        self.vrx = [(VxlanOracle(VX_RX_MAPS, VNIS, dev_mac=MY_MAC_B, check_spoof=c),
                     VxlanEngineImpl(VX_RX_MAPS, VNIS, dev_mac=MY_MAC_B, check_spoof=c))
                    for c in (True, False)]
        # hostile virtio headers: their own harnesses, and oracles to hold the plain ones to
        self.ttx = (Oracle(MAPS_TX), EngineImpl(MAPS_TX))
        self.tvx = (VxlanOracle(VX_TX_MAPS, VNIS, seed=9), VxlanEngineImpl(VX_TX_MAPS, VNIS,
                                                                          seed=9))
        self.t_drops = 0
        # GRO: receivers whose decisions the oracle checks datagram by datagram
        self.grx = (Oracle(MAPS_RX), EngineImpl(MAPS_RX))
        self.g_drops = 0
        self.tap, self.tap_reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.tap.setblocking(False)
        self.tap_reader.setblocking(False)
        rows = [MapRow.of(m, MTU, self.tap.fileno(), kind="vxlan", vni=v, port=8472,
                          dev_mac=MY_MAC_B) for m, v in zip(VX_RX_MAPS, VNIS)]
        self.vg_counters = new_counters()
        self.vg = fastpath.Harness(fastpath.Engine(rows), self.vg_counters)
        self.vg_oracle = VxlanOracle(VX_RX_MAPS, VNIS, dev_mac=MY_MAC_B)
        self.vg_drops = self.vg_rx = self.vg_merged = 0

    def close(self):
        self.tap.close()
        self.tap_reader.close()

    def fail(self, path: str, what: str, data) -> None:
        if isinstance(data, (bytes, bytearray)):
            data = data.hex() if len(data) <= 256 else f"{data[:256].hex()}... " \
                f"({len(data)} bytes)"
        raise Mismatch(f"{path}: {what} (seed {self.seed}, packet {self.packets[path]}; "
                       f"replay with FANPKT_FUZZ_SEED={self.seed}): {data}")

    def seen(self, path, outcome):
        key = (path, *outcome[:2])
        self.outcomes[key] = self.outcomes.get(key, 0) + 1

    def step(self, path: str) -> int:
        n = getattr(self, path)()
        self.packets[path] += n
        return n

    # -- engine vs oracle, one packet ----------------------------------------------------
    def _inner(self) -> bytes:
        pkt = random_ipv4(self.rng)
        return mutate(self.rng, pkt) if self.rng.random() < 0.4 else pkt

    def decap(self) -> int:
        d = outer_for(self.rng, self._inner())
        if self.rng.random() < 0.3:
            d = mutate(self.rng, d, 60)
        o, e = self.rx[self.rng.random() < 0.2]
        want, got = o.decap(d), e.decap(d)
        if want != got:
            self.fail("decap", f"engine {got[:2]} != oracle {want[:2]}", d)
        self.seen("decap", want)
        return 1

    def encap(self) -> int:
        pkt = self._inner()
        want, got = self.tx[0].encap(pkt), self.tx[1].encap(pkt)
        if want != got:
            self.fail("encap", f"engine {got[:2]} != oracle {want[:2]}", pkt)
        self.seen("encap", want)
        return 1

    def _frame(self) -> bytes:
        f = random_frame(self.rng)
        return mutate(self.rng, f, 50) if self.rng.random() < 0.3 else f

    def vxlan_decap(self) -> int:
        rng = self.rng
        data = struct.pack("!BBBBI", 8, 0, 0, 0, rng.choice(VNIS + [1]) << 8) + self._frame()
        if rng.random() < 0.2:
            data = mutate(rng, data, 50)
        osrc = rng.choice([SENDER, RECEIVER, 0x0A000001, 0xAC090909])
        otos = rng.randrange(4)
        o, e = self.vrx[rng.random() < 0.2]
        want, got = o.decap(data, osrc, otos), e.decap(data, osrc, otos)
        if want != got:
            self.fail("vxlan_decap", f"engine {got[:2]} != oracle {want[:2]}", data)
        self.seen("vxlan_decap", want)
        return 1

    def vxlan_encap(self) -> int:
        f = self._frame()
        want, got = self.vtx[0].encap(f), self.vtx[1].encap(f)
        got = (*got[:2], whole(got[2]), got[3])
        if want != got:
            self.fail("vxlan_encap", f"engine {got[:2]} != oracle {want[:2]}", f)
        self.seen("vxlan_encap", want)
        return 1

    # -- transmit with hostile virtio headers --------------------------------------------
    def _vnet(self, vxlan: bool, pkt: bytes) -> bytes:
        rng = self.rng
        what = rng.random()
        if what < 0.35:
            return bytes(10)
        l3 = 14 if vxlan else 0
        if what < 0.55:                             # a partial checksum somewhere
            return vnet(rng.choice([1, 1, 0, 2, 0xFF]), 0, 0, 0,
                        rng.choice([l3 + 20, l3 + 24, rng.randrange(0, len(pkt) + 40),
                                    0xFFFF]),
                        rng.choice([6, 16, 0, rng.randrange(0, 0x10000)]))
        if what < 0.85:                             # TSO, sane or not
            return vnet(rng.choice([1, 1, 0]), rng.choice([1, 1, 0x81, 3, 4, 5, 0xFF]),
                        rng.choice([l3 + 40, 0, 0xFFFF, rng.randrange(0x10000)]),
                        rng.choice([1, 2, 48, TCP_MIN_MSS - 1, TCP_MIN_MSS, 536, 1000,
                                    1428, 1460, 9000, 0xFFFF, rng.randrange(0x10000)]),
                        rng.choice([l3 + 20, 0, 0xFFFF, rng.randrange(0x10000)]),
                        rng.choice([16, 6, 0xFFFF, rng.randrange(0x10000)]))
        return rng.randbytes(10)

    def _tso_input(self, vxlan: bool) -> bytes:
        rng = self.rng
        eth = MY_MAC_B + PEER_MAC_B + b"\x08\x00" if vxlan else b""
        payload = rng.randbytes(rng.choice([0, 1, 100, 1400, 3000, 20000, 64000 - 54]))
        p = superpacket(0xF1030409, rng.choice([0xF1060708, 0xF1030401, 0xF1090901]),
                        4000, rng.randrange(1 << 32), payload, eth,
                        rng.choice([0x10, 0x18, 0x19, 0x02, 0x90, 0xD0]))
        return mutate(rng, p, 74) if rng.random() < 0.4 else p

    def transmit(self) -> int:
        rng = self.rng
        vxlan = rng.random() < 0.5
        oracle, eng = self.tvx if vxlan else self.ttx
        h = eng.harness
        pkt = self._tso_input(vxlan) if rng.random() < 0.4 else \
            (self._frame() if vxlan else self._inner())
        vh = self._vnet(vxlan, pkt)
        before = drops(eng.counters, "drop_tx_")
        plain = vh == bytes(10)
        if plain:
            oracle.ip_id = h.ip_id          # the oracle numbers from where the engine is
        v, reason, outs, dst = h.transmit(vh, pkt, vxlan=vxlan)
        v = v.name
        dropped = drops(eng.counters, "drop_tx_") - before
        name = COUNTER_NAMES[reason] if reason >= 0 else None
        if plain:                                   # a plain read: the oracle's answer
            want = oracle.encap(pkt)
            if v == "VERDICT_SEND":     # outer fragments (one ID) joined into one packet
                got_out = outs[0] if len(outs) == 1 else whole(outs)
            else:                       # written back to the TUN behind its virtio header
                got_out = outs[0][10:] if outs else b""
            got = (v, name.upper() if name else None, got_out, dst)
            if got != want:
                self.fail("transmit", f"plain read: engine {got[:2]} != oracle {want[:2]}",
                          pkt)
        # any header: bounded, well-formed output and one counted drop per drop
        if v == "VERDICT_DROP":
            if outs or name is None or not name.startswith("drop_tx_") or dropped != 1:
                self.fail("transmit", f"drop {name} with {len(outs)} outputs, "
                          f"{dropped} counted", vh + pkt)
        elif v == "VERDICT_SEND":
            if not 1 <= len(outs) <= len(pkt) // TCP_MIN_MSS + 2 or dropped:
                self.fail("transmit", f"{len(outs)} outputs, {dropped} drops", vh + pkt)
            # every outer packet within the MTU: a VXLAN TSO segment too big for it (a
            # gso_size over what the TAP's MTU allows) leaves in outer fragments
            for o in outs:
                tot = struct.unpack_from("!H", o, 2)[0] if len(o) >= 20 else -1
                if len(o) > MTU or o[0] != 0x45 or tot != len(o) or checksum(o[:20]) \
                        or o[9] != (17 if vxlan else 4):
                    self.fail("transmit", "a bad outer packet", vh + pkt)
        elif v == "VERDICT_ICMP":
            if len(outs) != 1 or len(outs[0]) > len(pkt) + 10 + 576:
                self.fail("transmit", f"{v} with {len(outs)} outputs", vh + pkt)
        self.t_drops += dropped
        self.seen("transmit", (v, name))
        return 1

    # -- receive bursts (GRO) ------------------------------------------------------------
    def _burst(self, runs: list[list[bytes]], random_one) -> list[bytes]:
        """Up to three flows' consecutive segments, interleaved, some mutated, some
        swapped, with random datagrams between."""
        rng = self.rng
        queues = []
        for _ in range(rng.randrange(1, 4)):
            run = rng.choice(runs)
            i = rng.randrange(len(run))
            queues.append(list(run[i:i + rng.randrange(1, 12)]))
        out = []
        while any(queues) and len(out) < 24:
            q = rng.choice([q for q in queues if q])
            d = q.pop(0)
            r = rng.random()
            if r < 0.08:
                d = mutate(rng, d, 80)
            elif r < 0.12:
                d = bytearray(d)
                d[rng.randrange(len(d))] ^= 1 << rng.randrange(8)
                d = bytes(d)
            out.append(d)
            if rng.random() < 0.1:
                out.append(random_one())
        if len(out) > 2 and rng.random() < 0.1:
            i = rng.randrange(len(out) - 1)
            out[i], out[i + 1] = out[i + 1], out[i]
        return out

    @staticmethod
    def _stream_piece(pkt: bytes, key0):
        """(connection key, bytes) of an inner IPv4 packet: a TCP segment's payload, or
        the whole of any other packet."""
        if len(pkt) < 20:
            return (key0, "short"), pkt
        ihl = (pkt[0] & 15) * 4
        frag = struct.unpack_from("!H", pkt, 6)[0] & 0x3FFF
        key = (key0, pkt[12:20], pkt[9])
        if pkt[9] == 6 and not frag and len(pkt) >= ihl + 20:
            thl = (pkt[ihl + 12] >> 4) * 4
            if thl >= 20 and len(pkt) >= ihl + thl:
                return (*key, pkt[ihl:ihl + 4]), pkt[ihl + thl:]
        return key, pkt

    @classmethod
    def _frame_piece(cls, frame: bytes, key0):
        if frame[12:14] == b"\x08\x00":
            return cls._stream_piece(frame[14:], (key0, frame[:14]))
        return (key0, frame[:14]), frame

    def _check_gro(self, path, delivered, writes, data, piece) -> None:
        """delivered: the oracle's (packet, map index) in input order; writes: the
        engine's (packet, map index, merged) in write order, merged True for a
        superpacket; piece(packet, map index): its connection key and stream bytes."""
        singles: dict = {}
        for pkt, idx in delivered:
            singles[(pkt, idx)] = singles.get((pkt, idx), 0) + 1
        want_streams: dict = {}
        for pkt, idx in delivered:
            key, part = piece(pkt, idx)
            want_streams.setdefault(key, []).append(part)
        got_streams: dict = {}
        for pkt, idx, merged in writes:
            if not merged:
                if not singles.get((pkt, idx)):
                    self.fail(path, "a packet written that the oracle does not deliver",
                              pkt)
                singles[(pkt, idx)] -= 1
            key, part = piece(pkt, idx)
            got_streams.setdefault(key, []).append(part)
        for key in want_streams.keys() | got_streams.keys():
            if b"".join(want_streams.get(key, [])) != b"".join(got_streams.get(key, [])):
                self.fail(path, f"connection {key} out of order or altered",
                          b"".join(data))

    @staticmethod
    def _merged_header_ok(ip: bytes) -> bool:
        return len(ip) >= 20 and not checksum(ip[:(ip[0] & 15) * 4]) and \
            struct.unpack_from("!H", ip, 2)[0] == len(ip)

    def _random_ipip(self) -> bytes:
        return outer_for(self.rng, self._inner())

    def receive(self) -> int:
        oracle, eng = self.grx
        burst = self._burst(self.corpus.ipip, self._random_ipip)[:64]
        before = drops(eng.counters, "drop_rx_")
        delivered = []
        for d in burst:
            v, _, inner, idx = oracle.decap(d)
            if v == "VERDICT_DELIVER":
                delivered.append((inner, idx))
        written = eng.harness.receive(burst)
        if sum(segs for _, segs, _ in written) != len(delivered):
            self.fail("receive", f"{sum(w[1] for w in written)} segments written, the "
                      f"oracle delivers {len(delivered)}", b"".join(burst))
        self.merged["receive"] += sum(segs > 1 for _, segs, _ in written)
        for idx, segs, buf in written:
            if segs > 1 and (buf[1] != 1 or not self._merged_header_ok(buf[10:])):
                self.fail("receive", "a bad superpacket", buf)
        self._check_gro("receive", delivered, [(buf[10:], idx, segs > 1)
                                               for idx, segs, buf in written],
                        burst, self._stream_piece)
        dropped = drops(eng.counters, "drop_rx_") - before
        if dropped != len(burst) - len(delivered):
            self.fail("receive", f"{dropped} drops counted for "
                      f"{len(burst) - len(delivered)}", b"".join(burst))
        self.g_drops += dropped
        return len(burst)

    def _random_vxlan(self) -> bytes:
        return struct.pack("!BBBBI", 8, 0, 0, 0, self.rng.choice(VNIS) << 8) + self._frame()

    def vxlan_receive(self) -> int:
        rng = self.rng
        burst = self._burst(self.corpus.vxlan, self._random_vxlan)[:8]
        osrc = rng.choice([SENDER, SENDER, SENDER, 0xAC090909])
        otos = rng.choice([0, 0, 0, 1, 2, 3])
        sizes = {len(p) for p in burst[:-1]}
        if len(burst) > 1 and len(sizes) == 1 and 0 < len(burst[-1]) <= sizes.pop() and \
                rng.random() < 0.5:
            # one UDP GRO buffer: the kernel joins datagrams of one size (the last may be
            # shorter, never empty: an empty one would vanish in the join)
            messages = [(b"".join(burst), len(burst[0]), osrc, otos)]
        else:
            messages = [(p, 0, osrc, otos) for p in burst]
        delivered = []
        for p in burst:
            v, _, frame, idx = self.vg_oracle.decap(p, osrc, otos)
            if v == "VERDICT_DELIVER":
                delivered.append((frame, idx))
        before = drops(self.vg_counters, "drop_rx_")
        self.vg.vxlan_receive(messages)
        writes = []
        while True:
            try:
                w = self.tap_reader.recv(1 << 17)
            except BlockingIOError:
                break
            writes.append(w)
        # rx_packets counts segments; rx_gro_merged those appended to an earlier one
        rx = int(self.vg_counters[COUNTER_NAMES.index("rx_packets")])
        merged = int(self.vg_counters[COUNTER_NAMES.index("rx_gro_merged")])
        if rx - self.vg_rx != len(delivered) or \
                len(writes) != len(delivered) - (merged - self.vg_merged):
            self.fail("vxlan_receive", f"rx_packets +{rx - self.vg_rx}, "
                      f"{len(writes)} writes: the oracle delivers {len(delivered)}",
                      b"".join(burst))
        self.vg_rx, self.vg_merged = rx, merged
        self.merged["vxlan_receive"] += sum(w[1] != 0 for w in writes)
        for w in writes:
            if w[1] and (w[1] != 1 or not self._merged_header_ok(w[24:])):
                self.fail("vxlan_receive", "a bad superpacket", w)
        # one TAP for both maps: which map a frame took is not visible, so key by 0
        self._check_gro("vxlan_receive", [(f, 0) for f, _ in delivered],
                        [(w[10:], 0, w[1] != 0) for w in writes], burst,
                        self._frame_piece)
        dropped = drops(self.vg_counters, "drop_rx_") - before
        if dropped != len(burst) - len(delivered):
            self.fail("vxlan_receive", f"{dropped} drops counted for "
                      f"{len(burst) - len(delivered)}", b"".join(burst))
        self.vg_drops += dropped
        return len(burst)

    # -- after a run ---------------------------------------------------------------------
    def check_counters(self) -> None:
        """Each harness counted exactly the drops its verdicts reported (the IPIP oracle
        counts drops too: the counters are compared one by one)."""
        for o, e in [self.tx, *self.rx]:
            for name in COUNTER_NAMES:
                if name.startswith("drop_") and e.counter(name) != o.counter(name):
                    raise Mismatch(f"counter {name}: engine {e.counter(name)}, oracle "
                                   f"{o.counter(name)} (seed {self.seed})")
        for what, got, want in (
                ("transmit", drops(self.ttx[1].counters, "drop_tx_") +
                 drops(self.tvx[1].counters, "drop_tx_"), self.t_drops),
                ("receive", drops(self.grx[1].counters, "drop_rx_"), self.g_drops),
                ("vxlan_receive", drops(self.vg_counters, "drop_rx_"), self.vg_drops)):
            if got != want:
                raise Mismatch(f"{what}: {got} drops counted, {want} seen (seed {self.seed})")


def run_packets(seed: int, total: int, weights=None, deadline: float = None) -> Fuzzer:
    """Feed about `total` packets, spread over the paths by weight (default: equal
    packets per path); stops early at `deadline` (time.monotonic())."""
    fz = Fuzzer(seed)
    weights = weights or {p: 1 for p in PATHS}
    # rounded up: the shares add up to at least total
    share = {p: -(-total * w // sum(weights.values())) for p, w in weights.items()}
    try:
        while any(fz.packets[p] < share[p] for p in PATHS):
            for p in PATHS:
                for _ in range(64):
                    if fz.packets[p] < share[p]:
                        fz.step(p)
            if deadline is not None and time.monotonic() > deadline:
                break
        fz.check_counters()
    finally:
        fz.close()
    return fz


# -- hostile text for the parsers ------------------------------------------------------
class FakeResolver:
    """Interfaces eth0 (172.16.3.4) and br0 (10.1.9.77); the default route via eth0."""
    ADDRS = {"eth0": 0xAC100304, "br0": 0x0A01094D}

    def interface_address(self, name):
        from fanpkt.errors import ConfigError
        if name not in self.ADDRS:
            raise ConfigError(f"no interface named {name!r}")
        return self.ADDRS[name]

    def default_interface(self):
        return "eth0"


WORDS = ["241.0.0.0/8", "241", "172.16.3.4/16", "172.16.3.4", "eth0", "eth0/16", "default",
         "default/20", "100.64.0.0/10", "10.1.9.77/20", "br0/12", "240.0.0.0/4",
         "10.0.0.0/8", "172.16.0.0/16", "0.0.0.0/0", "255.255.255.255/32", "dhcp",
         "host-reserve", "3", "bridge", "br-fan", "off", "nat", "type", "vxlan", "ipip",
         "vni", "15794176", "port", "8472", "enable", "#", "-1", "99999999999999999999",
         "1e3", "0x10", "٣", "²", "/", "//", "", " ", "\t", "\x00", "…", "241.0.0.0/33",
         "256.1.1.1/8", "241.0.0.1/8", "eth0/0", "a" * 16, "fan-241", "--", "-",
         "241.0.0.0/ 8", "1.2.3.4/16/16", "\ud800", "é", "sys", ".", ".."]
OPTIONS = ["-o", "-u", "-c", "--type", "--vni", "--port", "--no-spoof-check",
           "--underlay-send", "frames", "ip", "--run-dir", "--json", "map", "show",
           "stats", "--overlay", "--underlay", "--bogus", "-x", "--type=vxlan", "-o241"]


def hostile_words(rng: random.Random, pool, n: int) -> list[str]:
    out = []
    for _ in range(n):
        w = rng.choice(pool)
        r = rng.random()
        if r < 0.15:
            w = mutate(rng, w.encode("utf-8", "surrogatepass"), 64).decode("utf-8", "replace")
        elif r < 0.2:
            w = "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x10FFFF)]))
                        for _ in range(rng.randrange(1, 12)))
        out.append(w)
    return out


def fuzz_config(rng: random.Random):
    """One hostile /etc/network/fan file: a parsed list, or a FanError."""
    from fanpkt.config import parse_lines
    lines = [" ".join(hostile_words(rng, WORDS, rng.randrange(0, 9)))
             for _ in range(rng.randrange(1, 5))]
    if rng.random() < 0.3:
        lines.append(rng.choice(["241.0.0.0/8 172.16.3.4/16\n", "241 eth0 type vxlan\n",
                                 "100.64.0.0/10 default/20 bridge b1 dhcp\n"]))
    try:
        parse_lines(lines, "fuzz", FakeResolver())
    except FanError:
        pass
    except Exception as e:
        raise Mismatch(f"config parser raised {e!r} on {lines!r}") from e
    return lines


class _StubForwarder:
    """Takes the place of fanpkt.forwarder.Forwarder: argument handling only."""

    def __init__(self, specs, **kw):
        self.specs = specs
        self.exporter = None

    def handle_signals(self):
        pass

    def start(self):
        pass

    def serve(self, load):
        pass


def fuzz_cli(rng: random.Random, conf_path: str):
    """One hostile argv for `fanpkt` or `fanpkt-forward`: cli.run returns a status (a
    FanError becomes one line and its status); anything else escaping is a bug."""
    import fanpkt.cli as cli
    import fanpkt.forwarder as forwarder
    argv = hostile_words(rng, WORDS + OPTIONS + [conf_path], rng.randrange(0, 10))
    factory = rng.choice([cli.build_parser, cli.build_forward_parser])
    if factory is cli.build_parser and argv and rng.random() < 0.6:
        argv[0] = rng.choice(["map", "show", "stats"])
    # help (or an abbreviation argparse accepts, like --he) prints and exits 0, by design
    argv = [a for a in argv if a != "-h" and not (len(a) > 2 and "--help".startswith(a))]
    # the real run_forward also drops this process's capabilities once "started": not here
    saved = forwarder.Forwarder, cli.KernelResolver, cli.privileges.drop
    forwarder.Forwarder, cli.KernelResolver = _StubForwarder, FakeResolver
    cli.privileges.drop = lambda: True
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            status = cli.run(argv, factory)
    except BaseException as e:
        raise Mismatch(f"{factory.__name__} {argv!r} raised {e!r}") from e
    finally:
        forwarder.Forwarder, cli.KernelResolver, cli.privileges.drop = saved
    text = err.getvalue()
    # an error is a line "fanpkt: ..." (a map prints one per unroutable address), never a
    # traceback; hostile arguments quoted in it may hold any character
    if not isinstance(status, int) or (status and not text.startswith("fanpkt: ")) or \
            "Traceback" in text:
        raise Mismatch(f"{factory.__name__} {argv!r}: status {status!r}, stderr {text!r}")
    return argv


def run_parsers(seed: int, n: int, conf_dir: str) -> int:
    """n hostile config files and argvs (Mismatch on anything but a result or a
    FanError, naming the input; the seed replays the run)."""
    rng = random.Random(seed)
    conf = os.path.join(conf_dir, "fan")
    for k in range(n):
        fuzz_config(rng)
        if k % 4 == 0:          # a file for -c: hostile lines, or bytes that are not UTF-8
            with open(conf, "wb") as f:
                f.write("\n".join(hostile_words(rng, WORDS, 6)).encode("utf-8", "replace")
                        if rng.random() < 0.8 else rng.randbytes(40))
        fuzz_cli(rng, conf)
    return n


# -- tools/fuzz.sh -----------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Fuzz the engine (vs the oracle) and parsers.")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else seed_from_env()
    print(f"fuzz seed: {seed} (replay with FANPKT_FUZZ_SEED={seed}); core "
          f"{fastpath.__file__}", flush=True)
    start = time.monotonic()
    deadline = start + args.seconds
    total, rounds = 0, 0
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        while time.monotonic() < deadline:
            # each round its own seed, derived from the first, so a failure replays alone
            round_seed = (seed + rounds * 0x9E3779B1) & 0xFFFFFFFF
            try:
                fz = run_packets(round_seed, 70_000, deadline=deadline)
                run_parsers(round_seed, 500, tmp)
            except Mismatch as e:
                print(f"FAIL round {rounds}: {e}", flush=True)
                return 1
            total += sum(fz.packets.values())
            rounds += 1
            print(f"round {rounds} (seed {round_seed}): {total:,} packets, "
                  f"{time.monotonic() - start:.0f} s", flush=True)
    print(f"ok: {total:,} packets and {rounds * 500} parser cases in "
          f"{time.monotonic() - start:.0f} s, seed {seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
