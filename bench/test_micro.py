"""Micro-benchmarks: the engine against the oracle (and numpy for mapping), one run.

    python3 -m pytest bench/test_micro.py --benchmark-json=bench/results/micro.json
    python3 bench/report.py bench/results/micro.json > bench/results/micro.md

(micro.json holds every timing and is not kept in git; micro.md is.) Each engine benchmark
handles one batch of 64 packets per call, as the forwarder does. The transmit group runs
the real transmit path, tx_packet through the lane queue, as run_tx does between read()
and sendmmsg: virtio header, TSO split, encapsulation, queueing.
"""
from __future__ import annotations

import numpy as np
import pytest

from fanpkt.fanmap import FanMap
from fanpkt.engine import MapRow, fastpath, new_counters

from oracle import Oracle, checksum
from packets import PAYLOAD, inner, outer, superpacket, vnet

BATCH = 64
TX = [FanMap.parse("241.0.0.0/8", "172.16.3.4/16")]
RX = [FanMap.parse("241.0.0.0/8", "172.16.6.7/16")]


def packets(size):
    return [inner(size=size, dst=f"241.6.7.{8 + i % 200}") for i in range(BATCH)]


@pytest.mark.parametrize("size", [64, 1400])
@pytest.mark.benchmark(group="encap")
def test_encap_engine(benchmark, size):
    batch = fastpath.PacketBatch(packets(size))
    eng, c = fastpath.Engine([MapRow.of(m) for m in TX]), new_counters()
    assert benchmark(batch.encap_all, eng, c) == BATCH
    benchmark.extra_info.update(packets=BATCH, size=size)


@pytest.mark.parametrize("size", [64, 1400])
@pytest.mark.benchmark(group="encap")
def test_encap_oracle(benchmark, size):
    pkts, o = packets(size), Oracle(TX)
    benchmark(lambda: [o.encap(p) for p in pkts])
    benchmark.extra_info.update(packets=BATCH, size=size)


@pytest.mark.parametrize("size", [64, 1400])
@pytest.mark.benchmark(group="transmit")
def test_transmit_engine(benchmark, size):
    batch = fastpath.PacketBatch(packets(size), vnet())
    eng, c = fastpath.Engine([MapRow.of(m) for m in TX]), new_counters()
    assert benchmark(batch.transmit_all, eng, c) == BATCH
    benchmark.extra_info.update(packets=BATCH, size=size)


@pytest.mark.parametrize("size", [64, 1400])
@pytest.mark.benchmark(group="transmit")
def test_transmit_oracle(benchmark, size):
    pkts, o = packets(size), Oracle(TX)
    benchmark(lambda: [o.encap(p) for p in pkts])
    benchmark.extra_info.update(packets=BATCH, size=size)


@pytest.mark.benchmark(group="transmit")
def test_transmit_engine_tso(benchmark):
    """64 TCP superpackets of 20,000 bytes, split into 1428-byte segments: per segment."""
    mss = 1428
    batch = fastpath.PacketBatch([superpacket()] * BATCH, vnet(1, 1, 52, mss, 20, 16))
    eng, c = fastpath.Engine([MapRow.of(m) for m in TX]), new_counters()
    segs = BATCH * -(-len(PAYLOAD) // mss)
    assert benchmark(batch.transmit_all, eng, c) == segs
    benchmark.extra_info.update(packets=segs, size=f"TSO {mss}")


def ipip(size):
    return [outer(inner(size=size, src="241.3.4.9", dst=f"241.6.7.{8 + i % 200}"))
            for i in range(BATCH)]


@pytest.mark.parametrize("size", [64, 1400])
@pytest.mark.benchmark(group="decap")
def test_decap_engine(benchmark, size):
    batch = fastpath.PacketBatch(ipip(size))
    eng, c = fastpath.Engine([MapRow.of(m) for m in RX]), new_counters()
    assert benchmark(batch.decap_all, eng, c) == BATCH
    benchmark.extra_info.update(packets=BATCH, size=size)


@pytest.mark.parametrize("size", [64, 1400])
@pytest.mark.benchmark(group="decap")
def test_decap_oracle(benchmark, size):
    dgrams, o = ipip(size), Oracle(RX)
    benchmark(lambda: [o.decap(d) for d in dgrams])
    benchmark.extra_info.update(packets=BATCH, size=size)


@pytest.mark.parametrize("size", [64, 1400])
@pytest.mark.benchmark(group="checksum")
def test_checksum_engine(benchmark, size):
    batch = fastpath.PacketBatch(packets(size))
    benchmark(batch.checksum_all)
    benchmark.extra_info.update(packets=BATCH, size=size)


@pytest.mark.parametrize("size", [64, 1400])
@pytest.mark.benchmark(group="checksum")
def test_checksum_oracle(benchmark, size):
    pkts = packets(size)
    benchmark(lambda: [checksum(p) for p in pkts])
    benchmark.extra_info.update(packets=BATCH, size=size)


CLASSIC = FanMap.parse("241.0.0.0/8", "172.16.3.4/16")
ALL = np.arange(0xF1000000, 0xF2000000, dtype=np.uint32)       # all of 241.0.0.0/8


@pytest.mark.benchmark(group="map")
def test_map_numpy_whole_overlay(benchmark):
    def run():
        hosts, ok = CLASSIC.dest_batch(ALL)
        assert np.array_equal(CLASSIC.slice_batch(hosts[ok]), ALL[ok] & np.uint32(0xFFFFFF00))
    benchmark.pedantic(run, rounds=5, iterations=1)
    benchmark.extra_info.update(packets=ALL.size, note="map + round trip")


@pytest.mark.benchmark(group="map")
def test_map_numpy(benchmark):
    benchmark.pedantic(CLASSIC.dest_batch, (ALL,), rounds=5, iterations=1)
    benchmark.extra_info.update(packets=ALL.size)


@pytest.mark.benchmark(group="map")
def test_map_engine(benchmark):
    eng = fastpath.Engine([MapRow.of(CLASSIC)])
    out, ok = np.empty_like(ALL), np.empty(ALL.shape, np.uint8)
    benchmark.pedantic(fastpath.map_batch, (eng, ALL, out, ok), rounds=5, iterations=1)
    benchmark.extra_info.update(packets=ALL.size)


@pytest.mark.benchmark(group="map")
def test_map_python_scalar(benchmark):
    few = [int(x) for x in ALL[:100_000:7]]
    benchmark(lambda: [CLASSIC.dest(x) for x in few])
    benchmark.extra_info.update(packets=len(few))
