"""The overlay side: a TUN device per IPIP fan, a TAP device per VXLAN fan (a port of the
fan's bridge), created with python-pytun and configured with pyroute2. Packet I/O happens
on the fd, in the compiled loops, not here."""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct

import pytun
from pyroute2 import IPRoute

from .engine import DEV_GSO_TYPES
from .errors import ConfigError, DeviceError
from .netlink import disable_ipv6, link_index, sysctl

log = logging.getLogger("fanpkt")

TXQUEUELEN = 4000           # 500 (the default) dropped packets at ~3 Gbit/s (docs/internals.md §9)

# <linux/if_tun.h>: let the kernel hand us TCP superpackets and partial checksums, which
# the compiled loops split and complete (_fast/offload.pxd).
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02


# The environment variable that forces the probe's answers (troubleshooting, tests):
# comma-separated GSO type names, each with + (taken) or - (refused), e.g. "-udp_l4".
OFFLOADS_ENV = "FANPKT_OFFLOADS"
_GSO_TYPE = {"tcpv4": 1, "udp_l4": 5}       # virtio_net_hdr.gso_type (VIRTIO_NET_HDR_GSO_*)


def forced_offloads() -> dict[str, bool]:
    """FANPKT_OFFLOADS read: {GSO type name: taken}. A ConfigError if it is malformed."""
    forced = {}
    for item in filter(None, (s.strip() for s in os.environ.get(OFFLOADS_ENV, "").split(","))):
        name = item[1:]
        if item[:1] not in "+-" or name not in DEV_GSO_TYPES:
            raise ConfigError(f"{OFFLOADS_ENV}: {item!r} is not +NAME or -NAME with NAME "
                              f"one of {', '.join(sorted(DEV_GSO_TYPES))}")
        forced[name] = item[0] == "+"
    return forced


def probe_write(fd: int, gso_type: str, tap: bool) -> bool:
    """Does the kernel take a superpacket of this GSO type written to this TUN/TAP? fd's
    device must still be down: the kernel checks the virtio header (virtio_net_hdr_to_skb,
    EINVAL if it knows no such type) before it finds the device down (EIO), so the probe
    is answered and the packet dropped without reaching any stack. The probe is shaped as
    rx.pxi's writes are: two UDP datagrams or TCP segments of 100 bytes, NEEDS_CSUM."""
    l2 = b"\xff" * 12 + b"\x08\x00" if tap else b""
    udp = gso_type == "udp_l4"
    l4 = (struct.pack("!HHHH", 9, 9, 208, 0) if udp
          else struct.pack("!HHIIBBHHH", 9, 9, 1, 0, 0x50, 0x10, 0xffff, 0, 0))
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4) + 200, 0, 0x4000, 64,
                     17 if udp else 6, 0, b"\0\0\0\0", b"\0\0\0\0")
    vnet = struct.pack("=BBHHHH", 1, _GSO_TYPE[gso_type], len(l2) + 20 + len(l4), 100,
                       len(l2) + 20, 6 if udp else 16)
    try:
        os.write(fd, vnet + l2 + ip + l4 + bytes(200))
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        if e.errno == errno.EIO:        # the header passed; the device is down
            return True
        raise DeviceError(f"cannot probe the TUN/TAP device's offloads: {e.strerror}") \
            from None
    return True


def check_tun_available() -> None:
    if not os.path.exists("/dev/net/tun"):
        raise DeviceError("/dev/net/tun does not exist: load the tun module or give the "
                          "container access to /dev/net/tun")


def _tune(name: str) -> None:
    disable_ipv6(name)
    # fanpkt writes back packets whose source is this host's own overlay address (its ICMP
    # "fragmentation needed", local deliveries): without accept_local they are martians.
    sysctl(f"/proc/sys/net/ipv4/conf/{name}/accept_local", "1")


class Tun:
    """One TUN (or TAP) device. Keep the object alive: pytun closes the fd when it is
    collected."""

    def __init__(self, name: str, mtu: int, offload: bool = True, tap: bool = False,
                 queues: int = 1):
        """offload=False: plain packets, no virtio header (the Python baseline in bench/).
        tap: Ethernet frames, for a VXLAN fan. queues > 1: a multi-queue device
        (IFF_MULTI_QUEUE) with that many fds, `fds`; the kernel sends each flow to one of
        them (by its hash, or to the queue that last wrote the flow).

        With offload, `gso` says which superpackets the device takes in a write ({GSO
        type name: taken}, probed here, FANPKT_OFFLOADS forcing answers) and `dev_gso`
        the same as the engine's bits."""
        self.gso = {name: False for name in DEV_GSO_TYPES}
        self.dev_gso = 0
        check_tun_available()
        with IPRoute() as ipr:
            if link_index(ipr, name) is not None:
                raise DeviceError(f"device {name} already exists; remove it or choose "
                                  f"another overlay")
        # IFF_NO_PI: without it every packet carries a 4-byte prefix (pytun's default).
        # IFF_VNET_HDR: a 10-byte virtio_net_hdr instead, which carries the offloads.
        flags = ((pytun.IFF_TAP if tap else pytun.IFF_TUN) | pytun.IFF_NO_PI
                 | (pytun.IFF_VNET_HDR if offload else 0))
        self.queues = []
        if queues > 1:
            try:
                self.queues = [pytun.TunTapDevice(name=name,
                                                  flags=flags | pytun.IFF_MULTI_QUEUE)]
                flags |= pytun.IFF_MULTI_QUEUE
            except pytun.Error as e:    # a kernel (or sandbox) without multi-queue TUN
                log.warning("%s: no multi-queue %s device here (%s): one queue", name,
                            "TAP" if tap else "TUN", e)
                queues = 1
        try:
            if not self.queues:
                self.queues = [pytun.TunTapDevice(name=name, flags=flags)]
            # each further TUNSETIFF with the same name attaches one more queue
            self.queues += [pytun.TunTapDevice(name=name, flags=flags)
                            for _ in range(queues - 1)]
        except pytun.Error as e:
            self.close()
            raise DeviceError(f"cannot create {'TAP' if tap else 'TUN'} device {name}: "
                              f"{e}") from None
        self.dev = self.queues[0]
        self.name = name
        self.fds = [q.fileno() for q in self.queues]
        self.fd = self.fds[0]
        try:
            for fd in self.fds:
                if offload:
                    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4)
                os.set_blocking(fd, False)
        except OSError as e:
            self.close()
            raise DeviceError(f"cannot enable offloads on TUN device {name}: {e}") from None
        if offload:
            try:
                self._probe(tap)
            except (ConfigError, DeviceError):
                self.close()
                raise
        _tune(name)
        with IPRoute() as ipr:
            self.index = link_index(ipr, name)
            ipr.link("set", index=self.index, mtu=mtu, txqlen=TXQUEUELEN, state="up")

    def _probe(self, tap: bool) -> None:
        """Fill gso and dev_gso, while the device is still down (probe_write)."""
        forced = forced_offloads()
        for name, bit in DEV_GSO_TYPES.items():
            taken = forced[name] if name in forced else probe_write(self.fd, name, tap)
            self.gso[name] = taken
            self.dev_gso |= bit if taken else 0
        if not self.gso["udp_l4"]:
            log.info("%s: this kernel takes no UDP superpackets in TUN/TAP writes (Linux "
                     "6.2 does)%s: received UDP datagrams are written one by one%s",
                     self.name, " (FANPKT_OFFLOADS)" if "udp_l4" in forced else "",
                     ", and VXLAN frames sent one by one" if tap else "")
        if not self.gso["tcpv4"]:
            log.warning("%s: this kernel takes no TCP superpackets in TUN/TAP writes%s: "
                        "received TCP segments are written one by one", self.name,
                        " (FANPKT_OFFLOADS)" if "tcpv4" in forced else "")

    def close(self) -> None:
        """Closing the fds (every queue's) destroys the device, and with it its addresses
        and routes."""
        for q in getattr(self, "queues", []):
            q.close()
        self.queues = []
        self.dev = None
