"""The fast checksum against the slow reference for every length 0..9001, and RFC 1624;
each long-sum loop of csum.h (scalar, SSE2, AVX2) forced in turn, plus the one the CPU
picks."""
from __future__ import annotations

import random

import pytest

from fanpkt.engine import fastpath

from oracle import checksum


@pytest.fixture(autouse=True, params=["auto", "scalar", "sse2", "avx2"])
def path(request):
    """Every test once per loop. This CI's CPUs have AVX2 (a CPU without it, or another
    architecture, has fewer loops: those are skipped, saying so)."""
    if not fastpath.set_checksum_path(request.param):
        pytest.skip(f"no {request.param} checksum loop on this CPU or build")
    yield request.param
    assert fastpath.set_checksum_path("auto")


def test_every_length():
    rng = random.Random(1071)
    data = rng.randbytes(9001)
    for n in range(9002):
        assert fastpath.internet_checksum(data[:n]) == checksum(data[:n]), n


def test_every_offset_alignment():
    data = bytes(range(256)) * 8
    for off in range(16):
        chunk = data[off:off + 1499]
        assert fastpath.internet_checksum(memoryview(chunk)) == checksum(chunk)


def test_carries():
    # 65535 bytes of 0xff: the most any IPv4 packet adds into each 64-bit lane
    for n in (2, 8, 127, 128, 1500, 65535):
        assert fastpath.internet_checksum(b"\xff" * n) == checksum(b"\xff" * n)


def test_incremental_update_matches_recompute():
    rng = random.Random(1624)
    for _ in range(2000):
        words = [rng.randrange(65536) for _ in range(10)]
        data = b"".join(w.to_bytes(2, "big") for w in words)
        hc = checksum(data)
        new = rng.randrange(65536)
        data2 = new.to_bytes(2, "big") + data[2:]
        assert fastpath.checksum_update16(hc, words[0], new) == checksum(data2)
