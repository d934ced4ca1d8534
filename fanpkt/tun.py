"""The overlay side: a TUN device per fan, created with python-pytun and configured with
pyroute2. Packet I/O happens on the fd, in the compiled loops, not here."""
from __future__ import annotations

import os

import pytun
from pyroute2 import IPRoute

from .errors import DeviceError

TXQUEUELEN = 4000           # 500 (the default) dropped packets at ~3 Gbit/s (FIELD-NOTES)


def check_tun_available() -> None:
    if not os.path.exists("/dev/net/tun"):
        raise DeviceError("/dev/net/tun does not exist: load the tun module or give the "
                          "container access to /dev/net/tun")


def link_index(ipr: IPRoute, name: str) -> int | None:
    idx = ipr.link_lookup(ifname=name)
    return idx[0] if idx else None


def _no_ipv6(name: str) -> None:
    """fanpkt carries IPv4 only: without this, router solicitations and MLD reports from
    the kernel itself would show up as drop_tx_not_ipv4."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")
    except OSError:
        pass                # no IPv6 in this kernel: nothing to silence


class Tun:
    """One TUN device. Keep the object alive: pytun closes the fd when it is collected."""

    def __init__(self, name: str, mtu: int):
        check_tun_available()
        with IPRoute() as ipr:
            if link_index(ipr, name) is not None:
                raise DeviceError(f"device {name} already exists; remove it or choose "
                                  f"another overlay")
        try:
            # IFF_NO_PI: without it every packet carries a 4-byte prefix (pytun's default).
            self.dev = pytun.TunTapDevice(name=name, flags=pytun.IFF_TUN | pytun.IFF_NO_PI)
        except pytun.Error as e:
            raise DeviceError(f"cannot create TUN device {name}: {e}") from None
        self.name = name
        self.fd = self.dev.fileno()
        os.set_blocking(self.fd, False)
        _no_ipv6(name)
        with IPRoute() as ipr:
            self.index = link_index(ipr, name)
            ipr.link("set", index=self.index, mtu=mtu, txqlen=TXQUEUELEN, state="up")

    def close(self) -> None:
        """Closing the fd destroys the device, and with it its addresses and routes."""
        if self.dev is not None:
            self.dev.close()
            self.dev = None
