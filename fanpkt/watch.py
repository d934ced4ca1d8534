"""`fanpkt stats --watch [SECONDS]`: packets/s, bytes/s and drops/s per fan and direction,
a new table every SECONDS, as `watch ip -s link` would show them if it took differences.

On a terminal each table replaces the last (cursor home, clear); otherwise the tables
follow one another, a blank line apart, so the output can be piped and read. The rates are
counters.rates() between two readings of the counter file, one interval apart.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, Optional, TextIO

from .counters import Rate, rates
from .errors import ConfigError, NotRunning

CLEAR = "\033[H\033[2J"         # cursor home, erase the screen: what watch(1) does


def seconds(text: str) -> float:
    """The --watch interval: a positive number of seconds."""
    try:
        s = float(text)
    except ValueError:
        s = math.nan
    if not (math.isfinite(s) and 0.05 <= s <= 86400):
        raise ConfigError(f"--watch {text!r}: give an interval in seconds, 0.05 to 86400")
    return s


def human(n: float) -> str:
    """ip -h's style: 1 decimal and an SI prefix from k on."""
    for unit in ("", "k", "M", "G"):
        if abs(n) < 1000 or unit == "G":
            return f"{n:.1f}{unit}"
        n /= 1000
    raise AssertionError


def format_rates(pid: int, interval: float, rows: list[Rate]) -> str:
    width = max([3] + [len(r.fan) for r in rows])
    lines = [f"fanpkt-forward pid {pid}, rates over {interval:.2f} s",
             f"{'fan':{width}}  dir  {'packets/s':>10}  {'bytes/s':>10}  {'drops/s':>10}"]
    for r in rows:
        lines.append(f"{r.fan or '-':{width}}  {r.direction:3}  {human(r.packets):>10}  "
                     f"{human(r.bytes):>10}  {human(r.drops):>10}")
    return "\n".join(lines)


def watch(read: Callable[[], dict], interval: float, out: TextIO = sys.stdout,
          clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep) -> int:
    """Print rates until Ctrl-C (exit 0); NotRunning (exit 6) once the forwarder is gone.
    read: a snapshot of the counters (RunState.read_counters)."""
    tty = out.isatty()
    try:
        before, t0 = read(), clock()
        first = True
        while True:
            sleep(interval)
            try:
                after = read()
            except NotRunning:
                raise NotRunning("fanpkt-forward stopped (no forwarder runs in this network "
                                 "namespace any more)") from None
            t1 = clock()
            text = format_rates(after["pid"], t1 - t0, rates(before, after, t1 - t0))
            kernel = [f["device"] for f in after.get("fans", []) if f.get("datapath") == "kernel"]
            if kernel:      # their counters are the eBPF maps', copied every 0.1 s
                text += f"\non the kernel path: {', '.join(kernel)}"
            out.write((CLEAR if tty else "" if first else "\n") + text + "\n")
            out.flush()
            before, t0, first = after, t1, False
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:         # `| head`: the reader has seen enough
        _quiet_stdout(out)
        return 0


def _quiet_stdout(out: Optional[TextIO]) -> None:
    """After EPIPE, keep the interpreter's final flush of stdout from complaining."""
    import os
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
    except (OSError, AttributeError, ValueError):
        pass
