"""Small helpers over pyroute2 that several modules need: one definition each."""
from __future__ import annotations

from typing import Optional


def link_index(ipr, name: str) -> Optional[int]:
    """The index of interface `name`, or None; ipr is a pyroute2 IPRoute or NetNS."""
    idx = ipr.link_lookup(ifname=name)
    return idx[0] if idx else None


def link_kind(ipr, index: int) -> Optional[str]:
    """The kind of a link ('bridge', 'veth', 'tun', ...), None for a plain device."""
    links = ipr.get_links(index)
    info = links[0].get_attr("IFLA_LINKINFO") if links else None
    return info.get_attr("IFLA_INFO_KIND") if info else None


def sysctl(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError:
        pass                # e.g. no IPv6 in this kernel: nothing to set


def disable_ipv6(name: str) -> None:
    """IPv4 only: otherwise the kernel's own router solicitations and MLD reports would
    show up as drops (drop_tx_not_ipv4, drop_tx_ethertype)."""
    sysctl(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "1")


def mac_bytes(text: Optional[str]) -> bytes:
    """'02:aa:bb:cc:dd:01' (as netlink attributes spell a MAC) -> 6 bytes; b"" for
    anything that is not an Ethernet address (none, or a tunnel's 4-byte one)."""
    if not text or len(text) != 17:
        return b""
    try:
        return bytes.fromhex(text.replace(":", ""))
    except ValueError:
        return b""
