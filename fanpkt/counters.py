"""What the counters mean to their readers: each counter's direction and kind, a snapshot
summed per fan and direction, and the rates between two snapshots. Used by `fanpkt stats`
(its summaries), `--watch` and the Prometheus exporter (fanpkt/metrics.py), so all three
group alike.

Everything is derived from the counter names, i.e. from the `Counter` enum in
_fast/shared.pxi (docs/spec.md §5): `drop_<direction>_<reason>` is a drop,
`<direction>_packets` and `<direction>_bytes` are what a direction carried, and any other
`<direction>_<what>` counts a path some packets took (offloads, local delivery, ECN).
A snapshot is what runstate.totals() returns (`fanpkt stats --json`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

DIRECTIONS = ("tx", "rx")
PACKETS, BYTES, DROPPED, PATH = "packets", "bytes", "dropped", "path"


@dataclass(frozen=True)
class Kind:
    direction: str      # "tx" or "rx"
    family: str         # PACKETS, BYTES, DROPPED or PATH
    reason: str = ""    # a drop's reason: the name after drop_<direction>_


def kind(name: str) -> Kind:
    """The kind of counter `name`; ValueError for a name that follows no pattern (a new
    enum member must, or the tests say so)."""
    words = name.split("_")
    if words[0] == "drop" and len(words) > 2 and words[1] in DIRECTIONS:
        return Kind(words[1], DROPPED, "_".join(words[2:]))
    if words[0] in DIRECTIONS and len(words) > 1:
        rest = "_".join(words[1:])
        return Kind(words[0], rest if rest in (PACKETS, BYTES) else PATH)
    raise ValueError(f"counter {name!r} has no direction")


def loop_direction(loop: str) -> str:
    """A transmit loop's block is `tx:<device>`; every other loop receives."""
    return "tx" if loop.startswith("tx:") else "rx"


def fan_label(fans: list[str]) -> str:
    """The fan a loop counts for: its device, or, for a receive loop shared by several
    fans, their devices joined by commas ("" while it serves none)."""
    return ",".join(sorted(fans))


def by_fan(snap: dict) -> dict[tuple[str, str], dict[str, int]]:
    """{(fan, direction): {counter: value}}: each loop's counters of its own direction
    (the others stay 0 in its block) under its fan label, summed over loops."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    for loop, values in snap["loops"].items():
        d = loop_direction(loop)
        row = out.setdefault((fan_label(snap["loop_fans"].get(loop, [])), d), {})
        for name, v in values.items():
            if kind(name).direction == d:
                row[name] = row.get(name, 0) + v
    return out


def deltas(before: Optional[dict], after: dict) -> dict:
    """A snapshot of what each loop counted from `before` to `after`. Counters only grow
    while a block keeps its loop; one that went down was zeroed for a new loop, and a
    loop new in `after` (or a new forwarder, another pid) started from zero."""
    same = before is not None and before["pid"] == after["pid"]
    loops = {}
    for loop, values in after["loops"].items():
        was = before["loops"].get(loop, {}) if same else {}
        loops[loop] = {n: v - was.get(n, 0) if v >= was.get(n, 0) else v
                       for n, v in values.items()}
    return {**after, "loops": loops}


@dataclass(frozen=True)
class Rate:
    fan: str
    direction: str
    packets: float      # per second
    bytes: float
    drops: float


def rates(before: Optional[dict], after: dict, seconds: float) -> list[Rate]:
    """Packets, bytes and drops per second of each fan and direction between two
    snapshots taken `seconds` apart, sorted by fan, tx before rx."""
    rows = []
    for (fan, d), values in by_fan(deltas(before, after)).items():
        sums = {PACKETS: 0, BYTES: 0, DROPPED: 0}
        for name, v in values.items():
            family = kind(name).family
            if family in sums:
                sums[family] += v
        rows.append(Rate(fan, d, sums[PACKETS] / seconds, sums[BYTES] / seconds,
                         sums[DROPPED] / seconds))
    return sorted(rows, key=lambda r: (r.fan, DIRECTIONS.index(r.direction)))


@dataclass(frozen=True)
class Summary:
    """What one fan's (or one shared receive loop's) direction carried, for a person:
    totals, then only what is not zero."""
    fans: tuple[str, ...]       # the fans counted together: several for a shared rx loop
    direction: str
    packets: int
    bytes: int
    drops: int                  # every drop_ counter summed
    reasons: dict[str, int]     # the drop counters that are not zero, in enum order
    paths: dict[str, int]       # the path counters (offloads, ECN, frames) not zero


def summaries(snap: dict) -> dict[tuple[str, str], Summary]:
    """by_fan(snap) summed into a Summary per (fan label, direction)."""
    out = {}
    for (label, d), values in by_fan(snap).items():
        sums = {PACKETS: 0, BYTES: 0, DROPPED: 0}
        reasons, paths = {}, {}
        for name, v in values.items():
            family = kind(name).family
            if family in sums:
                sums[family] += v
            if v and family == DROPPED:
                reasons[name] = v
            elif v and family == PATH:
                paths[name] = v
        out[label, d] = Summary(tuple(label.split(",")) if label else (), d, sums[PACKETS],
                                sums[BYTES], sums[DROPPED], reasons, paths)
    return out


def human_bytes(n: int) -> str:
    """Bytes in SI units, one decimal from kB on: 512 B, 1.5 kB, 3.2 GB."""
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        value /= 1000
        if value < 999.95 or unit == "PB":
            return f"{value:.1f} {unit}"
    raise AssertionError
