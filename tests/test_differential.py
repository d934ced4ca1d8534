"""Engine vs oracle on >= 100,000 seeded random and mutated packets: identical verdicts,
drop reasons and bytes. The seed is printed; FANPKT_SEED=<n> replays a run."""
from __future__ import annotations

import os
import random
import struct

from fanpkt.engine import COUNTER_NAMES
from fanpkt.fanmap import FanMap

from engine_impl import EngineImpl
from oracle import Oracle, with_checksum
from packets import mutate

N_PACKETS = 100_000
ID_START = 65536 - 500
SEED = int(os.environ.get("FANPKT_SEED", random.randrange(1 << 32)))

# Sender 172.16.3.4 and receiver 172.16.6.7 on the classic fan plus an unaligned one.
MAPS_TX = [FanMap.parse("241.0.0.0/8", "172.16.3.4/16"),
           FanMap.parse("100.64.0.0/10", "172.16.3.4/20")]
MAPS_RX = [FanMap.parse("241.0.0.0/8", "172.16.6.7/16"),
           FanMap.parse("100.64.0.0/10", "172.16.6.7/20")]
ADDRS = [0xF1030409, 0xF1060708, 0xF1030401, 0xF1FFFF01, 0xF1000001, 0x64475BC8,
         0x64400001, 0x0A000001, 0xAC100304, 0xAC100607, 0xF1060709]


def random_ipv4(rng: random.Random) -> bytes:
    ihl = rng.choice([5, 5, 5, 6, 15])
    size = rng.choice([ihl * 4, 40, 64, 300, 1400, 1480, 1481, 1500, rng.randrange(20, 2000)])
    size = max(size, ihl * 4)
    hdr = struct.pack("!BBHHHBBHII", 0x40 | ihl, rng.randrange(256), size,
                      rng.randrange(65536), rng.choice([0, 0x4000, 0x2000, 0x0010, 0x4000]),
                      rng.choice([1, 64, 255, 0]), rng.choice([1, 6, 17, 4]), 0,
                      rng.choice(ADDRS), rng.choice(ADDRS))
    hdr += bytes(rng.randrange(256) for _ in range(ihl * 4 - 20))
    hdr = with_checksum(hdr)
    body = bytes([rng.choice([3, 8, 0, 11])]) + rng.randbytes(size - len(hdr) - 1) \
        if size > len(hdr) else b""
    return hdr + body


def outer_for(rng: random.Random, inner: bytes) -> bytes:
    src = rng.choice([0xAC100304, 0xAC100607, 0x0A000001, 0xAC10FFFF])
    hdr = struct.pack("!BBHHHBBHII", 0x45, rng.randrange(4), 20 + len(inner), 1,
                      0x4000, 64, 4, 0, src, 0xAC100607)
    return with_checksum(hdr) + inner


def test_differential():
    print(f"differential seed: {SEED} (replay with FANPKT_SEED={SEED})")
    rng = random.Random(SEED)
    tx_o, tx_e = Oracle(MAPS_TX), EngineImpl(MAPS_TX)
    # Each keeps its own outer IP ID, compared in every output (the outer header and the
    # ICMP's are in the bytes); starting near the top, the run crosses 65535 -> 0.
    tx_o.ip_id = tx_e.harness.ip_id = ID_START
    receivers = [(Oracle(MAPS_RX, check_spoof=c), EngineImpl(MAPS_RX, check_spoof=c))
                 for c in (True, False)]
    seen: dict = {}
    for n in range(N_PACKETS):
        pkt = random_ipv4(rng)
        if rng.random() < 0.4:
            pkt = mutate(rng, pkt)
        if n % 2:
            o, e = tx_o.encap(pkt), tx_e.encap(pkt)
        else:
            d = outer_for(rng, pkt)
            if rng.random() < 0.2:
                d = mutate(rng, d)
            rx_o, rx_e = receivers[rng.random() < 0.2]
            o, e = rx_o.decap(d), rx_e.decap(d)
        assert e == o, f"packet {n} differs (seed {SEED}): {pkt.hex()}"
        seen[o[:2]] = seen.get(o[:2], 0) + 1
    ids_used = seen.get(("VERDICT_SEND", None), 0) + seen.get(("VERDICT_ICMP",
                                                               "DROP_TX_TOO_BIG"), 0)
    assert ids_used > 65536 - ID_START                  # the IDs wrapped
    assert tx_e.harness.ip_id == tx_o.ip_id == (ID_START + ids_used) & 0xFFFF
    for name in COUNTER_NAMES:                          # and counted the same drops
        if name.startswith("drop_"):
            for oracle, engine in [(tx_o, tx_e), *receivers]:
                assert engine.counter(name) == oracle.counter(name), name
    # the generator must reach every outcome, or the comparison proves little
    reasons = {k[1] for k in seen if k[1]}
    assert {"VERDICT_SEND", "VERDICT_ICMP", "VERDICT_DELIVER"} <= \
        {k[0] for k in seen}
    assert reasons == {
        "DROP_TX_NOT_IPV4", "DROP_TX_MALFORMED", "DROP_TX_NO_MAP", "DROP_TX_UNROUTABLE",
        "DROP_TX_LOCAL_UNUSED", "DROP_TX_TOO_BIG", "DROP_RX_TRUNCATED", "DROP_RX_BAD_OUTER",
        "DROP_RX_NOT_IPIP", "DROP_RX_SRC_NOT_UNDERLAY", "DROP_RX_OUTER_DST",
        "DROP_RX_BAD_INNER",
        "DROP_RX_BAD_INNER_CSUM", "DROP_RX_NOT_LOCAL", "DROP_RX_SPOOFED_SRC",
        "DROP_RX_ECN_CE_NOT_ECT"}, sorted(reasons)
