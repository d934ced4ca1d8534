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
               Both receive paths also get runs of UDP datagrams of one flow, which the
               engine joins into UDP GSO superpackets (VNET_GSO_UDP_L4): such a write is
               cut where the kernel would cut it (gso_size) and each datagram held to the
               oracle's (addresses, ports, TOS, flags, TTL and payload; the kernel gives
               the IDs and checksums).
  vxlan_receive  the same for VXLAN bursts through Harness.vxlan_receive: several
               messages a burst, each one datagram or a UDP-GRO buffer of equal-sized
               datagrams, each with its own outer source and destination (V2), the TAP a
               socketpair.
  transmit_run a burst of TAP reads (UDP frames of a few flows, sizes, ECN, ARP, frames
               to drop, a TSO superpacket, mutated frames) through Harness.transmit_burst
               to a resolved neighbour: runs leave in UDP GSO sends, which, cut as the
               kernel cuts them, must be packet for packet (IDs, ports, checksums) what
               the frame-by-frame path sends, in the same order.
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
from test_vxlan import LOCAL_MAC, MY_MAC, PEER_MAC, RX_MAPS as VX_RX_MAPS, \
    TX_MAPS as VX_TX_MAPS, VNIS, random_frame, whole

PATHS = ("decap", "encap", "vxlan_decap", "vxlan_encap", "transmit", "receive",
         "vxlan_receive", "transmit_run")
MTU = 1500
TCP_MIN_MSS = 88
PEER_MAC_B, MY_MAC_B = (bytes.fromhex(m.replace(":", "")) for m in (PEER_MAC, MY_MAC))
SENDER, RECEIVER = 0xAC100304, 0xAC100607          # 172.16.3.4 -> 172.16.6.7
IFINDEX, TX_MAC, RX_MAC = 2, bytes.fromhex("0200ac100304"), bytes.fromhex("0200ac100607")
VNET_GSO_TCPV4, VNET_GSO_UDP_L4 = 1, 5


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


def udp_datagram(src: int, dst: int, sport: int, payload: bytes, ident: int, tos: int = 0,
                 csum: bool = True) -> bytes:
    """An option-less IPv4/UDP datagram, DF set, its checksums valid (csum False: the UDP
    checksum 0, none sent)."""
    udp = struct.pack("!HHHH", sport, 5300, 8 + len(payload), 0)
    if csum:
        c = checksum(struct.pack("!IIBBH", src, dst, 0, 17, 8 + len(payload)) + udp +
                     payload) or 0xFFFF
        udp = udp[:6] + struct.pack("!H", c)
    ip = struct.pack("!BBHHHBBHII", 0x45, tos, 28 + len(payload), ident & 0xFFFF, 0x4000,
                     64, 17, 0, src, dst)
    return ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:] + udp + payload


def split_udp_gso(ip: bytes, gso_size: int) -> list[bytes]:
    """A UDP GSO superpacket (IPv4 without options) cut as the kernel cuts it: one
    datagram per gso_size bytes of UDP payload, each with the superpacket's headers and its
    own lengths (IDs and checksums, which the kernel sets, left as they are)."""
    body, out = ip[28:], []
    for i in range(0, len(body), gso_size):
        piece = body[i:i + gso_size]
        out.append(ip[:2] + struct.pack("!H", 28 + len(piece)) + ip[4:24] +
                   struct.pack("!H", 8 + len(piece)) + ip[26:28] + piece)
    return out


def kernel_udp_gso(msg: bytes) -> list[bytes]:
    """What the kernel makes of a UDP GSO superpacket handed to a packet socket with a
    virtio header (flags NEEDS_CSUM, UDP_L4): the outer IPv4/UDP packets, IDs counting up
    from the first, lengths and both checksums recomputed."""
    flags, gso_type, _, gso_size, start, offset = struct.unpack_from("=BBHHHH", msg)
    outer = msg[10 + 14:]
    if (flags, start, offset) != (1, 34, 6) or gso_type not in (0, VNET_GSO_UDP_L4) or \
            struct.unpack_from("!H", outer, 24)[0] != len(outer) - 20:
        raise Mismatch(f"a bad UDP GSO send: {msg[:64].hex()}")
    pieces = split_udp_gso(outer, gso_size) if gso_type else [outer]
    ident = struct.unpack_from("!H", outer, 4)[0]
    out = []
    for k, p in enumerate(pieces):
        hdr = bytearray(p[:20])
        struct.pack_into("!HH", hdr, 4, (ident + k) & 0xFFFF, struct.unpack_from("!H", p, 6)[0])
        struct.pack_into("!H", hdr, 10, 0)
        struct.pack_into("!H", hdr, 10, checksum(bytes(hdr)))
        udp = bytearray(p[20:28])
        struct.pack_into("!H", udp, 6, 0)
        pseudo = struct.pack("!4s4sBBH", p[12:16], p[16:20], 0, 17, len(p) - 20)
        struct.pack_into("!H", udp, 6, checksum(pseudo + bytes(udp) + p[28:]) or 0xFFFF)
        out.append(bytes(hdr) + bytes(udp) + p[28:])
    return out


class Corpus:
    """Segment runs of TCP flows, as the sender's engine puts them on the wire (TSO split):
    the receive paths' GRO needs long valid runs, which random bytes never make."""

    def __init__(self, rng: random.Random):
        self.ipip: list[list[bytes]] = []           # IPIP datagrams, outer header first
        self.vxlan: list[list[bytes]] = []          # VXLAN UDP payloads
        # runs of UDP datagrams of one flow (one size, the last maybe shorter), which the
        # receive paths join into UDP GSO superpackets
        self.ipip_udp: list[list[bytes]] = []
        self.vxlan_udp: list[list[bytes]] = []
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
        for k in range(16):
            src, dst = rng.choice([(0xF1030409, 0xF1060708), (0xF103040A, 0xF1060709)])
            size = rng.choice([1, 20, 100, 500, 1000, 1400])
            n = rng.randrange(2, 40)
            tos = rng.choice([0, 0, 1, 2])
            csum = rng.random() < 0.9
            sizes = [size] * (n - 1) + [rng.choice([size, rng.randrange(1, size + 1)])]
            dgrams = [udp_datagram(src, dst, 6000 + k, rng.randbytes(m), 100 + i, tos, csum)
                      for i, m in enumerate(sizes)]
            run = []
            for d in dgrams:
                v, _, outs, _ = ipip.transmit(bytes(10), d)
                if v.name == "VERDICT_SEND":
                    run += outs
            self.ipip_udp.append(run)
            run = []
            for d in dgrams:
                if len(d) <= 1450:
                    v, _, outs, _ = vx.transmit(bytes(10), eth + d, vxlan=True)
                    if v.name == "VERDICT_SEND":
                        run += [o[28:] for o in outs]
            if run:
                self.vxlan_udp.append(run)
        assert self.ipip and self.vxlan and self.ipip_udp and self.vxlan_udp


# -- the fuzzer ------------------------------------------------------------------------
class Fuzzer:
    """One seeded run. step(path) feeds one input (or one burst) through a path and
    returns how many packets it was; a disagreement raises Mismatch naming the seed."""

    def __init__(self, seed: int):
        self.seed = seed
        self.rng = random.Random(seed)
        self.corpus = Corpus(random.Random(seed ^ 0x5A5A))
        self.packets = {p: 0 for p in PATHS}
        # superpackets GRO wrote (of them, UDP GSO ones), transmit runs sent together
        self.merged = {"receive": 0, "vxlan_receive": 0, "receive_udp": 0,
                       "vxlan_receive_udp": 0, "transmit_run": 0}
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
        for pair in self.vrx:           # a local container's MAC (V3, drop_rx_local_mac)
            for impl in pair:
                impl.local_macs = {LOCAL_MAC}
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
        vg_engine = fastpath.Engine(rows)
        vg_engine.set_local_macs([LOCAL_MAC])
        vg_engine.retire()
        self.vg = fastpath.Harness(vg_engine, self.vg_counters)
        self.vg_oracle = VxlanOracle(VX_RX_MAPS, VNIS, dev_mac=MY_MAC_B)
        self.vg_oracle.local_macs = {LOCAL_MAC}
        self.vg_drops = self.vg_rx = self.vg_merged = 0
        # transmit runs: a burst harness and a frame-by-frame one, both to a resolved
        # neighbour, RECEIVER
        self.run_h, self.run_ref = (fastpath.Harness(self._run_engine(), new_counters())
                                    for _ in range(2))
        self.run_sock, self.run_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.run_peer.setblocking(False)

    @staticmethod
    def _run_engine():
        eng = fastpath.Engine([MapRow.of(VX_TX_MAPS[0], MTU, -1, "eth0", IFINDEX, TX_MAC,
                                         kind="vxlan", vni=VNIS[0], port=8472,
                                         dev_mac=PEER_MAC_B)], seed=3)
        eng.set_neighbours([(RECEIVER, IFINDEX, RX_MAC)])
        return eng

    def close(self):
        for s in (self.tap, self.tap_reader, self.run_sock, self.run_peer):
            s.close()

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
        odst = rng.choice([RECEIVER] * 8 + [0xAC10FFFF, 0x0A630001])
        o, e = self.vrx[rng.random() < 0.2]
        want, got = o.decap(data, osrc, otos, 8472, odst), e.decap(data, osrc, otos, 8472, odst)
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
        if pkt[9] == 17 and ihl == 20 and not frag and len(pkt) >= 28 and \
                struct.unpack_from("!H", pkt, 2)[0] == len(pkt):
            # a datagram: what a UDP GSO superpacket keeps of it (the kernel sets IDs and
            # checksums when it cuts one), its payload's length marking where it ends
            return (*key, pkt[20:24], pkt[1], pkt[6:9]), \
                struct.pack("!H", len(pkt) - 28) + pkt[28:]
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

    def _merged(self, path: str, vh: bytes, l2: bytes, ip: bytes, segs: int) -> list[bytes]:
        """A superpacket write (virtio header vh, then l2 and the IPv4 packet ip) of segs
        segments, checked: a TCP one as it is; a UDP one cut into its datagrams, as the
        kernel will cut it (split_udp_gso), each returned behind l2."""
        flags, gso_type, hdr_len, gso_size, start, offset = struct.unpack_from("=BBHHHH", vh)
        if flags != 1 or not self._merged_header_ok(ip) or start != len(l2) + 20:
            self.fail(path, "a bad superpacket", vh + l2 + ip)
        if gso_type == VNET_GSO_TCPV4 and ip[9] == 6 and offset == 16:
            return [l2 + ip]
        pieces = split_udp_gso(ip, gso_size) if gso_size else []
        if (gso_type != VNET_GSO_UDP_L4 or ip[9] != 17 or offset != 6
                or hdr_len != len(l2) + 28 or len(pieces) != segs
                or struct.unpack_from("!H", ip, 24)[0] != len(ip) - 20
                or any(len(p) != 28 + gso_size for p in pieces[:-1])):
            self.fail(path, f"a bad UDP superpacket of {segs}", vh + l2 + ip)
        return [l2 + p for p in pieces]

    def _random_ipip(self) -> bytes:
        return outer_for(self.rng, self._inner())

    def receive(self) -> int:
        oracle, eng = self.grx
        burst = self._burst(self.corpus.ipip + self.corpus.ipip_udp, self._random_ipip)[:64]
        before = drops(eng.counters, "drop_rx_")
        delivered = []
        for d in burst:
            v, _, inner, idx = oracle.decap(d)
            if v == "VERDICT_DELIVER":
                delivered.append((inner, idx))
        written = eng.harness.receive(burst)
        if sum(segs for _, segs, _, _ in written) != len(delivered):
            self.fail("receive", f"{sum(w[1] for w in written)} segments written, the "
                      f"oracle delivers {len(delivered)}", b"".join(burst))
        self.merged["receive"] += sum(segs > 1 for _, segs, _, _ in written)
        self.merged["receive_udp"] += sum(segs > 1 and buf[1] == VNET_GSO_UDP_L4
                                          for _, segs, buf, _ in written)
        writes = []
        for idx, segs, buf, _ in written:
            if segs > 1:
                writes += [(p, idx, True) for p in
                           self._merged("receive", buf[:10], b"", buf[10:], segs)]
            else:
                writes.append((buf[10:], idx, False))
        self._check_gro("receive", delivered, writes, burst, self._stream_piece)
        dropped = drops(eng.counters, "drop_rx_") - before
        if dropped != len(burst) - len(delivered):
            self.fail("receive", f"{dropped} drops counted for "
                      f"{len(burst) - len(delivered)}", b"".join(burst))
        self.g_drops += dropped
        return len(burst)

    def _random_vxlan(self) -> bytes:
        return struct.pack("!BBBBI", 8, 0, 0, 0, self.rng.choice(VNIS) << 8) + self._frame()

    def _messages(self, burst: list[bytes]) -> list[tuple]:
        """The burst as the messages of one recvmmsg: each one datagram, or a UDP GRO
        buffer of consecutive datagrams of one size (the last may be shorter, never
        empty: an empty one would vanish in the join), each with its own outer source,
        TOS and destination (mostly ours; the underlay broadcast or another address of
        ours now and then, V2)."""
        rng = self.rng
        out, i = [], 0
        while i < len(burst):
            k = 1
            if rng.random() < 0.5:
                size = len(burst[i])
                while (i + k < len(burst) and k < 16 and len(burst[i + k]) <= size
                       and len(burst[i + k - 1]) == size and len(burst[i + k])):
                    k += 1
                k = rng.randrange(1, k + 1)
            group = burst[i:i + k]
            osrc = rng.choice([SENDER, SENDER, SENDER, 0xAC090909])
            otos = rng.choice([0, 0, 0, 1, 2, 3])
            odst = rng.choice([RECEIVER] * 10 + [0xAC10FFFF, 0x0A630001])
            out.append((b"".join(group), len(group[0]) if k > 1 else 0, osrc, otos, odst,
                        group))
            i += k
        return out

    def vxlan_receive(self) -> int:
        rng = self.rng
        runs = self.corpus.vxlan + self.corpus.vxlan_udp
        burst = self._burst(runs, self._random_vxlan)
        if rng.random() < 0.3:      # a longer burst: several flows' runs, many messages
            for _ in range(rng.randrange(1, 4)):
                burst += self._burst(runs, self._random_vxlan)
        messages = self._messages(burst[:96])[:64]
        burst = [d for m in messages for d in m[5]]
        delivered = []
        for payload, _, osrc, otos, odst, group in messages:
            for p in group:
                v, _, frame, idx = self.vg_oracle.decap(p, osrc, otos, 8472, odst)
                if v == "VERDICT_DELIVER":
                    delivered.append((frame, idx))
        before = drops(self.vg_counters, "drop_rx_")
        self.vg.vxlan_receive([m[:5] for m in messages])
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
        self.merged["vxlan_receive_udp"] += sum(w[1] == VNET_GSO_UDP_L4 for w in writes)
        frames = []
        for w in writes:
            if w[1]:
                # how many segments a superpacket holds is not written: count them out
                n = 1 if w[1] == VNET_GSO_TCPV4 else -(-(len(w) - 10 - 14 - 28) //
                                                       max(1, struct.unpack_from("=H", w, 4)[0]))
                frames += [(f, 0, True) for f in
                           self._merged("vxlan_receive", w[:10], w[10:24], w[24:], n)]
            else:
                frames.append((w[10:], 0, False))
        # one TAP for both maps: which map a frame took is not visible, so key by 0
        self._check_gro("vxlan_receive", [(f, 0) for f, _ in delivered], frames, burst,
                        self._frame_piece)
        dropped = drops(self.vg_counters, "drop_rx_") - before
        if dropped != len(burst) - len(delivered):
            self.fail("vxlan_receive", f"{dropped} drops counted for "
                      f"{len(burst) - len(delivered)}", b"".join(burst))
        self.vg_drops += dropped
        return len(burst)

    # -- transmit runs: a burst against the frame-by-frame path --------------------------
    def _run_read(self) -> bytes:
        rng = self.rng
        r = rng.random()
        eth = RX_MAC + TX_MAC + b"\x08\x00"
        if r < 0.03:
            return vnet(1, 1, 54, rng.choice([536, 1398]), 34, 16) + superpacket(
                0xF1030409, 0xF1060708, 4000, rng.randrange(1 << 32),
                rng.randbytes(rng.choice([100, 3000, 9000])), eth)
        if r < 0.06:
            return bytes(10) + RX_MAC + TX_MAC + b"\x08\x06" + struct.pack(
                "!HHBBH6sI6sI", 1, 0x0800, 6, 4, 1, TX_MAC, 0xF1030409, bytes(6), 0xF1060708)
        if r < 0.08:                # to this host's own slice: dropped (X2)
            return bytes(10) + eth + udp_datagram(0xF1030409, 0xF1030420, 1, b"x", 1)
        if r < 0.1:
            return bytes(10) + mutate(rng, eth + udp_datagram(0xF1030409, 0xF1060708, 2,
                                                              b"y" * 30, 2), 50)
        sport = rng.choice([4000, 4001, 4002])
        size = rng.choice([20, 20, 20, 20, 64, 1000, 1400, rng.randrange(1, 1400)])
        return bytes(10) + eth + udp_datagram(0xF1030409, 0xF1060708 + rng.randrange(2),
                                              sport, rng.randbytes(size), 0,
                                              rng.choice([0, 0, 0, 0, 2, 3]))

    def transmit_run(self) -> int:
        rng = self.rng
        reads = [self._run_read() for _ in range(rng.randrange(1, 65))]
        h, ref = self.run_h, self.run_ref
        ref.ip_id = h.ip_id             # the same IDs from here on, read by read
        verdicts = h.transmit_burst(reads, self.run_sock.fileno())
        sent = []
        while True:
            try:
                msg = self.run_peer.recv(1 << 17)
            except BlockingIOError:
                break
            # a GSO send starts with its virtio header (flags NEEDS_CSUM = 1), a frame
            # with the neighbour's MAC (02:...)
            if msg[0] == 1:
                sent += kernel_udp_gso(msg)
                self.merged["transmit_run"] += 1
            else:
                sent.append(msg[14:])
        want = []
        for r, v in zip(reads, verdicts):
            rv, reason, outs, _ = ref.transmit(r[:10], r[10:], vxlan=True)
            if rv != v:
                self.fail("transmit_run", f"verdict {v.name}, frame by frame {rv.name}", r)
            # what goes to the neighbour (a mutated frame's other destinations take the
            # raw IP lane, which in the burst harness sends nowhere)
            want += [o[14:] for o in outs if o[:6] == RX_MAC]
        if sent != want:
            self.fail("transmit_run", f"{len(sent)} packets sent, frame by frame "
                      f"{len(want)} (or not the same)", b"".join(reads))
        self.seen("transmit_run", (verdicts[-1].name, None))
        return len(reads)

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
