"""The configuration users already have: /etc/network/fan lines and fanctl arguments
(docs/spec.md §3), resolved to FanSpec objects.

Interface names and the default route are looked up through a Resolver; the kernel one
uses pyroute2, tests pass their own.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import stat
from dataclasses import dataclass
from typing import Iterable, Optional, Protocol

from .errors import ConfigError
from .fanmap import IFNAMSIZ, FanMap, FanTable, decimal

DEFAULT_UNDERLAY_LEN = 16   # fanctl: a bare address or interface implies /16
MAX_FANS = 16               # fans one forwarder runs (its counter file has a block each)
MAX_CONFIG = 1 << 20        # bytes: a fan file holds a few lines (read_text)
# Queues per TUN/TAP and receive loops per VXLAN port, each with its own thread
# (docs/internals.md §8): one per CPU by default, at most this many. The one definition:
# setup.py compiles the engine with it (_fast/fanmap.pxd), reading this literal without
# importing the package.
MAX_QUEUES = 8


def default_queues() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), MAX_QUEUES))
VXLAN_PORT = 8472           # the kernel's vxlan default, which LXD's fan uses (dstport 0)
IPIP_OVERHEAD = 20          # outer IPv4
VXLAN_OVERHEAD = 50         # outer IPv4 + UDP + VXLAN + the frame's Ethernet header
TYPES = ("ipip", "vxlan")
# Where a VXLAN fan's packets are carried (docs/internals.md, the kernel path): the
# kernel's own vxlan driver steered by eBPF (fanpkt/kernelpath.py), the userspace engine,
# or auto: the kernel path where it can be set up, else the userspace engine.
DATAPATHS = ("auto", "kernel", "user")
DEFAULT_DATAPATH = "auto"


class Resolver(Protocol):
    def interface_address(self, ifname: str) -> int:
        """The first IPv4 address (IFA_LOCAL) of ifname."""

    def default_interface(self) -> str:
        """The interface of the IPv4 default route."""


class KernelResolver:
    """Resolver backed by netlink (pyroute2), in the current network namespace."""

    def interface_address(self, ifname: str) -> int:
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            if not idx:
                raise ConfigError(f"no interface named {ifname!r}")
            for msg in ipr.get_addr(family=socket.AF_INET, index=idx[0]):
                local = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                if local:
                    return int(ipaddress.IPv4Address(local))
        raise ConfigError(f"interface {ifname!r} has no IPv4 address")

    def default_interface(self) -> str:
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            for route in ipr.get_default_routes(family=socket.AF_INET):
                oif = route.get_attr("RTA_OIF")
                if oif:
                    links = ipr.get_links(oif)
                    if links:
                        return links[0].get_attr("IFLA_IFNAME")
        raise ConfigError("there is no IPv4 default route to take the underlay from")


@dataclass
class FanSpec:
    """One fan: a map plus the flags of its config line or fanctl command."""
    map: FanMap
    dhcp: bool = False
    bridge: Optional[str] = None
    off: bool = False
    nat: bool = False
    origin: str = "command line"    # 'FILE:LINE' for file entries
    type: str = "ipip"              # or "vxlan" (docs/spec.md §6)
    vni: Optional[int] = None       # VXLAN: None is LXD's default, overlay address >> 8
    port: int = VXLAN_PORT          # VXLAN UDP port
    datapath: str = DEFAULT_DATAPATH  # VXLAN: auto, kernel or user (DATAPATHS)

    @property
    def vxlan(self) -> bool:
        return self.type == "vxlan"

    @property
    def vni_value(self) -> int:
        return self.vni if self.vni is not None else self.map.overlay >> 8

    @property
    def overhead(self) -> int:
        """Underlay MTU minus overlay MTU."""
        return VXLAN_OVERHEAD if self.vxlan else IPIP_OVERHEAD

    @property
    def bridge_name(self) -> Optional[str]:
        """The bridge the fan lives on: the one given, or for VXLAN (which always needs
        one) fanbr-<overlay octets>, e.g. fanbr-241 (at most 14 characters)."""
        if self.bridge or not self.vxlan:
            return self.bridge
        return "fanbr-" + self.map.device_name[len("fan-"):]

    @property
    def flags(self) -> list[str]:
        out = []
        if self.vxlan:
            out.append("type vxlan")
            if self.vni is not None:
                out.append(f"vni {self.vni}")
            if self.port != VXLAN_PORT:
                out.append(f"port {self.port}")
            if self.datapath != DEFAULT_DATAPATH:
                out.append(f"datapath {self.datapath}")
        if self.dhcp:
            out.append("dhcp")
        if self.map.host_reserve != 1:
            out.append(f"host-reserve {self.map.host_reserve}")
        if self.bridge:
            out.append(f"bridge {self.bridge}")
        if self.nat:
            out.append("nat")
        if self.off:
            out.append("off")
        return out

    def key(self) -> tuple:
        """What must match for a reload to keep this fan running untouched."""
        return (self.map, self.bridge, self.nat, self.dhcp, self.type, self.vni_value,
                self.port, self.datapath)


def resolve_underlay(text: str, resolver: Resolver) -> str:
    """Any fanctl underlay form -> 'A.B.C.D/W' naming this host and the underlay prefix."""
    left, sep, width = text.partition("/")
    plen = (decimal(width, f"underlay {text!r}: prefix length", 1, 32) if sep
            else DEFAULT_UNDERLAY_LEN)
    try:
        host = int(ipaddress.IPv4Address(left))
    except ValueError:
        if left == "default":
            left = resolver.default_interface()
        elif not left or len(left) > IFNAMSIZ or all(ch in "0123456789." for ch in left):
            raise ConfigError(f"underlay {text!r} is neither an IPv4 address nor an "
                              f"interface name") from None
        host = resolver.interface_address(left)
    return f"{ipaddress.IPv4Address(host)}/{plen}"


def parse_flags(tokens: list[str]) -> dict:
    """dhcp, host-reserve N, bridge NAME, off, nat, type ipip|vxlan, vni N, port N,
    datapath auto|kernel|user. Unknown tokens are errors."""
    out: dict = {}
    it = iter(tokens)
    for tok in it:
        if tok in ("dhcp", "off", "nat"):
            out[tok] = True
        elif tok in ("host-reserve", "bridge", "type", "vni", "port", "datapath"):
            val = next(it, None)
            if val is None:
                raise ConfigError(f"flag {tok!r} needs a value")
            if tok == "host-reserve":
                out["host_reserve"] = decimal(val, "host-reserve")
            elif tok == "bridge":
                if len(val) > IFNAMSIZ or "/" in val or val in (".", ".."):
                    raise ConfigError(f"bridge name {val!r} is not a valid interface name")
                out["bridge"] = val
            elif tok == "vni":
                out["vni"] = decimal(val, "vni", 0, (1 << 24) - 1)
            elif tok == "port":
                out["port"] = decimal(val, "port", 1, 65535)
            elif tok == "datapath":
                if val not in DATAPATHS:
                    raise ConfigError(f"datapath {val!r}: give one of {', '.join(DATAPATHS)}")
                out["datapath"] = val
            elif val not in TYPES:
                raise ConfigError(f"type {val!r} is not supported: fanpkt carries "
                                  f"{' and '.join(TYPES)}")
            else:
                out["type"] = val
        elif tok == "enable":
            pass                    # fanctl's explicit default
        else:
            raise ConfigError(f"unknown flag {tok!r}")
    return out


def make_spec(overlay: str, underlay: str, flag_tokens: list[str], resolver: Resolver,
              origin: str = "command line") -> FanSpec:
    flags = parse_flags(flag_tokens)
    kind = flags.get("type", "ipip")
    if kind != "vxlan" and ("vni" in flags or "port" in flags):
        raise ConfigError("vni and port are flags of 'type vxlan' fans")
    if kind != "vxlan" and flags.get("datapath", "user") != "user":
        raise ConfigError("an IPIP fan runs on the userspace engine: 'datapath' other than "
                          "user is for 'type vxlan' fans")
    m = FanMap.parse(overlay, resolve_underlay(underlay, resolver),
                     flags.get("host_reserve", 1))
    m.local_slice                   # a fan to bring up needs a host: fail here if none
    return FanSpec(m, dhcp=flags.get("dhcp", False), bridge=flags.get("bridge"),
                   off=flags.get("off", False), nat=flags.get("nat", False), origin=origin,
                   type=kind, vni=flags.get("vni"), port=flags.get("port", VXLAN_PORT),
                   # an IPIP fan has no kernel path (no ipip module): always the engine
                   datapath=flags.get("datapath", DEFAULT_DATAPATH) if kind == "vxlan"
                   else "user")


def parse_lines(lines: Iterable[str], path: str, resolver: Resolver) -> list[FanSpec]:
    """/etc/network/fan: '<overlay> <underlay> [flags]' a line, '#' comments."""
    specs = []
    for n, raw in enumerate(lines, 1):
        tokens = raw.split("#", 1)[0].split()
        if not tokens:
            continue
        where = f"{path}:{n}"
        if len(tokens) < 2:
            raise ConfigError(f"{where}: expected '<overlay> <underlay> [flags]', "
                              f"got {raw.strip()!r}")
        try:
            specs.append(make_spec(tokens[0], tokens[1], tokens[2:], resolver, where))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    check_table(specs)
    return specs


def parse_file(path: str, resolver: Resolver) -> list[FanSpec]:
    return parse_lines(read_text(path).splitlines(), path, resolver)


def read_text(path: str) -> str:
    """A configuration file's text. Only a regular file of at most MAX_CONFIG bytes: the
    forwarder's main thread reads it (a control request may name any path), and a FIFO
    would block it, /dev/zero fill its memory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"cannot read {path}: not a regular file")
        data = b""
        while len(data) <= MAX_CONFIG:
            chunk = os.read(fd, MAX_CONFIG + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG:
        raise ConfigError(f"cannot read {path}: over {MAX_CONFIG} bytes, no fan file is")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file") from None


def check_table(specs: list[FanSpec]) -> FanTable:
    """Overlapping overlays, duplicate bridges and too many fans are configuration
    errors."""
    active = [s for s in specs if not s.off]
    if len(active) > MAX_FANS:
        raise ConfigError(f"{len(active)} fans: one forwarder runs at most {MAX_FANS}")
    table = FanTable()
    bridges: dict[str, str] = {}
    vnis: dict[tuple[int, int], str] = {}
    for s in specs:
        if s.off:
            continue
        try:
            table.add(s.map)
        except ConfigError as e:
            raise ConfigError(f"{s.origin}: {e}") from None
        if s.bridge_name:
            if s.bridge_name in bridges:
                raise ConfigError(f"{s.origin}: bridge {s.bridge_name} is already used by "
                                  f"{bridges[s.bridge_name]}")
            bridges[s.bridge_name] = s.origin
        if s.vxlan:
            if (s.port, s.vni_value) in vnis:
                raise ConfigError(f"{s.origin}: VNI {s.vni_value} on port {s.port} is "
                                  f"already used by {vnis[s.port, s.vni_value]}")
            vnis[s.port, s.vni_value] = s.origin
    return table
