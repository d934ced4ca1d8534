"""The overlay side: a TUN device per IPIP fan, a TAP device per VXLAN fan (a port of the
fan's bridge), created with python-pytun and configured with pyroute2. Packet I/O happens
on the fd, in the compiled loops, not here."""
from __future__ import annotations

import fcntl
import os

import pytun
from pyroute2 import IPRoute

from .errors import DeviceError
from .netlink import link_index

TXQUEUELEN = 4000           # 500 (the default) dropped packets at ~3 Gbit/s (docs/internals.md §9)

# <linux/if_tun.h>: let the kernel hand us TCP superpackets and partial checksums, which
# the compiled loops split and complete (_fast/offload.pxd).
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02


def check_tun_available() -> None:
    if not os.path.exists("/dev/net/tun"):
        raise DeviceError("/dev/net/tun does not exist: load the tun module or give the "
                          "container access to /dev/net/tun")


def _sysctl(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError:
        pass                # e.g. no IPv6 in this kernel: nothing to set


def disable_ipv6(name: str) -> None:
    """IPv4 only: otherwise the kernel's own router solicitations and MLD reports would
    show up as drops (drop_tx_not_ipv4, drop_tx_ethertype)."""
    _sysctl(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "1")


def _tune(name: str) -> None:
    disable_ipv6(name)
    # fanpkt writes back packets whose source is this host's own overlay address (its ICMP
    # "fragmentation needed", local deliveries): without accept_local they are martians.
    _sysctl(f"/proc/sys/net/ipv4/conf/{name}/accept_local", "1")


class Tun:
    """One TUN (or TAP) device. Keep the object alive: pytun closes the fd when it is
    collected."""

    def __init__(self, name: str, mtu: int, offload: bool = True, tap: bool = False,
                 queues: int = 1):
        """offload=False: plain packets, no virtio header (the Python baseline in bench/).
        tap: Ethernet frames, for a VXLAN fan. queues > 1: a multi-queue device
        (IFF_MULTI_QUEUE) with that many fds, `fds`; the kernel sends each flow to one of
        them (by its hash, or to the queue that last wrote the flow)."""
        check_tun_available()
        with IPRoute() as ipr:
            if link_index(ipr, name) is not None:
                raise DeviceError(f"device {name} already exists; remove it or choose "
                                  f"another overlay")
        try:
            # IFF_NO_PI: without it every packet carries a 4-byte prefix (pytun's default).
            # IFF_VNET_HDR: a 10-byte virtio_net_hdr instead, which carries the offloads.
            flags = ((pytun.IFF_TAP if tap else pytun.IFF_TUN) | pytun.IFF_NO_PI
                     | (pytun.IFF_VNET_HDR if offload else 0)
                     | (pytun.IFF_MULTI_QUEUE if queues > 1 else 0))
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
        _tune(name)
        with IPRoute() as ipr:
            self.index = link_index(ipr, name)
            ipr.link("set", index=self.index, mtu=mtu, txqlen=TXQUEUELEN, state="up")

    def close(self) -> None:
        """Closing the fds (every queue's) destroys the device, and with it its addresses
        and routes."""
        for q in getattr(self, "queues", []):
            q.close()
        self.queues = []
        self.dev = None
