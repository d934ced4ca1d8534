"""The Fan address map (docs/spec.md §1-2): validation, slice and destination math,
reserved addresses, device names, a table of maps, and a numpy batch form.

Control-plane code: plain Python integers. The data path has its own C form of the same
arithmetic in _fast/fanmap.pxd; tests hold the two to the same answers. numpy is imported
only by the batch form, so a forwarder never loads it.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Optional

from .errors import ConfigError, Unroutable

#: Overlay prefixes that cannot carry a fan (this network, loopback, multicast).
FORBIDDEN_OVERLAYS = tuple(ipaddress.IPv4Network(n) for n in
                           ("0.0.0.0/8", "127.0.0.0/8", "224.0.0.0/4"))
MAX_SLICE_LEN = 30          # network, gateway, one container, broadcast
IFNAMSIZ = 15               # Linux interface names, without the NUL

if TYPE_CHECKING:
    import numpy as np


def mask(n: int) -> int:
    """The 32-bit mask with n leading ones."""
    return (0xFFFFFFFF << (32 - n)) & 0xFFFFFFFF if n else 0


def hostmask(n: int) -> int:
    """The 32-bit mask of the bits below an n-bit prefix: ~mask(n)."""
    return ~mask(n) & 0xFFFFFFFF


def ip(a: int) -> str:
    return str(ipaddress.IPv4Address(a))


def decimal(text: str, what: str, lo: int = 0, hi: Optional[int] = None) -> int:
    """A number written in ASCII digits, lo..hi; a clear error naming `what` otherwise.
    (str.isdigit() also takes '²' and Arabic-Indic digits, which int() then rejects or
    reads as numbers nobody meant.)"""
    if not (text.isascii() and text.isdigit()):
        raise ConfigError(f"{what} {text!r} is not a number")
    n = int(text)
    if n < lo or (hi is not None and n > hi):
        raise ConfigError(f"{what} {n} must be {lo}..{hi}" if hi is not None else
                          f"{what} {n} must be at least {lo}")
    return n


def expand_overlay(text: str) -> str:
    """fanctl's shorthand: '241' is 241.0.0.0/8; any other text is returned as it is."""
    if text.isascii() and text.isdigit():
        return f"{decimal(text, 'overlay', 0, 255)}.0.0.0/8"
    return text


def parse_prefix(text: str, what: str) -> tuple[int, int]:
    """'A.B.C.D/W' -> (address, W), host bits kept; a clear error naming `what`."""
    addr, sep, width = text.partition("/")
    try:
        a = int(ipaddress.IPv4Address(addr))
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not an IPv4 address") from None
    if not sep:
        raise ConfigError(f"{what} {text!r} needs a prefix length, e.g. {addr}/16")
    return a, decimal(width, f"{what} {text!r}: prefix length", 0, 32)


@dataclass(frozen=True)
class FanMap:
    """overlay O/o over underlay U/u, optionally for a local host H inside U/u."""
    overlay: int
    overlay_len: int
    underlay: int
    underlay_len: int
    host: Optional[int] = None
    host_reserve: int = 1

    def __post_init__(self):
        o, u = self.overlay_len, self.underlay_len
        onet = f"{ip(self.overlay)}/{o}"
        unet = f"{ip(self.underlay)}/{u}"
        if self.overlay & hostmask(o):
            raise ConfigError(f"overlay {onet} is not a network address "
                              f"(did you mean {ip(self.overlay & mask(o))}/{o}?)")
        if self.underlay & hostmask(u):
            raise ConfigError(f"underlay {unet} is not a network address "
                              f"(did you mean {ip(self.underlay & mask(u))}/{u}?)")
        if u <= o:
            raise ConfigError(f"underlay prefix /{u} must be longer than overlay prefix /{o} "
                              f"({onet} over {unet})")
        if self.slice_len > MAX_SLICE_LEN:
            raise ConfigError(f"{onet} over {unet} gives /{self.slice_len} slices; at most "
                              f"/{MAX_SLICE_LEN} leaves room for containers "
                              f"(shorten the overlay or lengthen the underlay prefix)")
        net = ipaddress.IPv4Network(onet)
        for bad in FORBIDDEN_OVERLAYS:
            if net.overlaps(bad):
                raise ConfigError(f"overlay {onet} overlaps {bad}, which cannot carry a fan")
        if net.overlaps(ipaddress.IPv4Network(unet)):
            raise ConfigError(f"overlay {onet} and underlay {unet} overlap")
        if not 1 <= self.host_reserve <= self.slice_size - 3:
            raise ConfigError(f"host-reserve {self.host_reserve} must be between 1 and "
                              f"{self.slice_size - 3} for /{self.slice_len} slices")
        if self.host is not None:
            h = self.host
            if h & mask(u) != self.underlay:
                raise ConfigError(f"host {ip(h)} is not inside underlay {unet}")
            why = self.why_unroutable(h)
            if why:
                raise ConfigError(f"host {why}: it owns no usable slice")

    # -- construction ------------------------------------------------------------------
    @classmethod
    def parse(cls, overlay: str, underlay: str, host_reserve: int = 1) -> "FanMap":
        """From 'O/o' (or fanctl's 'N' for N.0.0.0/8) and 'U/u' or fanctl's 'H/u'."""
        oa, o = parse_prefix(expand_overlay(overlay), "overlay")
        ua, u = parse_prefix(underlay, "underlay")
        # fanctl's '172.16.3.4/16' names this host and the underlay 172.16.0.0/16 at once.
        host = ua if ua & hostmask(u) else None
        return cls(oa, o, ua & mask(u), u, host, host_reserve)

    # -- derived values ----------------------------------------------------------------
    @property
    def host_bits(self) -> int:
        return 32 - self.underlay_len

    @property
    def slice_len(self) -> int:
        return self.overlay_len + self.host_bits

    @property
    def slice_size(self) -> int:
        return 1 << (32 - self.slice_len)

    @property
    def shift(self) -> int:
        return self.underlay_len - self.overlay_len

    @property
    def overlay_net(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network((self.overlay, self.overlay_len))

    @property
    def underlay_net(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network((self.underlay, self.underlay_len))

    def in_overlay(self, a: int) -> bool:
        return a & mask(self.overlay_len) == self.overlay

    def in_underlay(self, a: int) -> bool:
        return a & mask(self.underlay_len) == self.underlay

    def slice_of(self, h: int) -> int:
        """slice(H) = O | ((H & ~mask(u)) << (u - o)): the network address of H's slice."""
        if not self.in_underlay(h):
            raise ConfigError(f"{ip(h)} is not inside underlay {self.underlay_net}")
        return self.overlay | ((h & hostmask(self.underlay_len)) << self.shift)

    def dest(self, d: int) -> int:
        """dest(D) = U | ((D & ~mask(o)) >> (u - o)): the underlay host of overlay address D."""
        if not self.in_overlay(d):
            raise ConfigError(f"{ip(d)} is not inside overlay {self.overlay_net}")
        return self.underlay | ((d & hostmask(self.overlay_len)) >> self.shift)

    def why_unroutable(self, underlay_host: int) -> Optional[str]:
        """None for a host that owns a slice; else why not, as a phrase naming it."""
        hb = underlay_host & hostmask(self.underlay_len)
        if hb == 0 or hb == hostmask(self.underlay_len):
            what = "network" if hb == 0 else "broadcast"
            return f"{ip(underlay_host)} is the {what} address of underlay {self.underlay_net}"
        return None

    def routable(self, underlay_host: int) -> bool:
        return self.why_unroutable(underlay_host) is None

    def unroutable(self, a: int) -> Optional[str]:
        """None if address a (overlay, or underlay host) leads to a slice; else the one
        message that says why not."""
        overlay = self.in_overlay(a)
        why = self.why_unroutable(self.dest(a) if overlay else a)
        if why is None:
            return None
        return f"{ip(a)} maps to underlay host {why}: unroutable" if overlay else \
            f"{why}: unroutable"

    def dest_checked(self, d: int) -> int:
        why = self.unroutable(d)
        if why:
            raise Unroutable(why)
        return self.dest(d)

    def slice_edge(self, a: int) -> bool:
        """Is overlay address a the network or broadcast address of its slice (docs/spec.md §2:
        unusable, so the data path neither sends nor delivers to it)?"""
        hb = a & hostmask(self.slice_len)
        return hb == 0 or hb == hostmask(self.slice_len)

    def usable_range(self, h: int) -> tuple[int, int]:
        """First and last container address of host h's slice: past the host reserve,
        before the broadcast (docs/spec.md §2). dhcp hands out exactly these."""
        net = self.slice_of(h)
        return net + self.host_reserve + 1, net + self.slice_size - 2

    def slice_info(self, h: int) -> dict:
        """Everything derived from host h's slice (docs/spec.md §2)."""
        net = self.slice_of(h)
        size = self.slice_size
        first, last = self.usable_range(h)
        return {
            "slice": f"{ip(net)}/{self.slice_len}",
            "gateway": ip(net + 1),
            "host_reserved": [ip(net + 1), ip(net + self.host_reserve)],
            "usable_first": ip(first),
            "usable_last": ip(last),
            "usable_count": max(0, last - first + 1),
            "broadcast": ip(net + size - 1),
        }

    @property
    def local_slice(self) -> int:
        if self.host is None:
            # a /31 or /32 has no host address to suggest (and .255.255.255 + 1 none at all)
            example = (f", e.g. {ip(self.underlay + 1)}/{self.underlay_len}"
                       if self.underlay_len <= 30 else "")
            raise ConfigError(f"underlay {self.underlay_net} names no host; give this host's "
                              f"address{example}")
        return self.slice_of(self.host)

    @property
    def gateway(self) -> int:
        return self.local_slice + 1

    @property
    def device_name(self) -> str:
        """fan-<overlay octets>: fan-241, fan-100-64; hex where octets would not fit."""
        octets = self.overlay.to_bytes(4, "big")[: (self.overlay_len + 7) // 8] or b"\0"
        name = "fan-" + "-".join(str(b) for b in octets)
        if len(name) > IFNAMSIZ:
            name = f"fan-{self.overlay:08x}"
        return name

    def __str__(self):
        under = (f"{ip(self.host)}/{self.underlay_len}" if self.host is not None
                 else str(self.underlay_net))
        return f"{self.overlay_net} {under}"

    # -- batch form --------------------------------------------------------------------
    def dest_batch(self, addrs: "np.ndarray") -> "tuple[np.ndarray, np.ndarray]":
        """Map a uint32 array of overlay addresses to underlay hosts, no Python loop.

        Returns (hosts, ok): ok is False where the address is outside the overlay or maps to
        the underlay network or broadcast (unroutable); hosts is 0 there.
        """
        import numpy as np
        a = np.asarray(addrs, dtype=np.uint32)
        omask = np.uint32(mask(self.overlay_len))
        hmask = np.uint32(hostmask(self.underlay_len))
        hb = (a & ~omask) >> np.uint32(self.shift)
        ok = ((a & omask) == np.uint32(self.overlay)) & (hb != 0) & (hb != hmask)
        hosts = np.where(ok, hb | np.uint32(self.underlay), np.uint32(0))
        return hosts, ok

    def slice_batch(self, hosts: "np.ndarray") -> "np.ndarray":
        """slice(H) for a uint32 array of underlay hosts (no range check)."""
        import numpy as np
        h = np.asarray(hosts, dtype=np.uint32)
        hmask = np.uint32(hostmask(self.underlay_len))
        return (h & hmask) << np.uint32(self.shift) | np.uint32(self.overlay)


class FanTable:
    """Several maps with non-overlapping overlays; lookups both ways."""

    def __init__(self, maps: Iterable[FanMap] = ()):
        self.maps: list[FanMap] = []
        for m in maps:
            self.add(m)

    def add(self, m: FanMap) -> None:
        for other in self.maps:
            if m.overlay_net.overlaps(other.overlay_net):
                raise ConfigError(f"overlay {m.overlay_net} overlaps {other.overlay_net} "
                                  f"of another map")
            if m.overlay_net.overlaps(other.underlay_net) or \
                    m.underlay_net.overlaps(other.overlay_net):
                raise ConfigError(f"map {m} overlaps map {other} (overlay vs underlay)")
            if m.device_name == other.device_name:
                raise ConfigError(f"maps {m} and {other} would share device {m.device_name}")
        self.maps.append(m)
        # Longest overlay prefix first: the first match is the longest-prefix match.
        self.maps.sort(key=lambda x: -x.overlay_len)

    def for_overlay(self, a: int) -> Optional[FanMap]:
        return next((m for m in self.maps if m.in_overlay(a)), None)

    def for_underlay(self, a: int) -> list[FanMap]:
        return [m for m in self.maps if m.in_underlay(a)]

    def __iter__(self):
        return iter(self.maps)

    def __len__(self):
        return len(self.maps)
