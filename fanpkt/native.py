"""The compiled core is mandatory: import it from here, and a missing build is one line."""
from .errors import BuildError

try:
    from . import _fastpath as fastpath
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    raise BuildError(f"the compiled core fanpkt._fastpath is missing or broken ({e}); "
                     "build it with `pip install -e .` (needs Cython and a C compiler)") from None

COUNTER_NAMES = fastpath.counter_names()
COUNTER_BLOCK = fastpath.COUNTER_BLOCK
Verdict = fastpath.Verdict


def engine_row(m, mtu: int = 1500, tun_fd: int = -1, ifname: str = "", ifindex: int = 0,
               mac: bytes = b"") -> tuple:
    """A FanMap as the row Engine.load() takes. ifname is the underlay interface; ifindex
    and mac, when given, let the map send frames to resolved neighbours on it."""
    return (m.overlay, m.overlay_len, m.underlay, m.underlay_len, m.host, m.host_reserve,
            mtu, tun_fd, ifname, ifindex, mac)


def new_counters(blocks: int = 1):
    import numpy as np
    return np.zeros(blocks * COUNTER_BLOCK, dtype=np.uint64)
