"""Host plumbing around the data path (docs/design.md §11), with pyroute2 and nftables:
addresses, the overlay route, bridges, the bridge's dnsmasq, forwarding, NAT, and the
rule that keeps the kernel quiet about IPIP it has no tunnel for. Everything made here is
recorded (Plumbing) so that it can be removed, by this run or, after a crash, by the next.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass
from typing import Optional

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import dhcp
from .config import FanSpec
from .errors import DeviceError, FanError
from .fanmap import ip
from .netlink import link_index

log = logging.getLogger("fanpkt")
NFT_TABLE = "fanpkt"
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
# Creating the table first makes the delete succeed whether or not it existed: `nft -f`
# applies a file atomically, so the table is replaced as a whole or not at all.
NFT_RESET = f"table ip {NFT_TABLE} {{}}\ndelete table ip {NFT_TABLE}\n"


@dataclass
class Plumbing:
    """What attach() made for one fan: enough to undo it, now or after a crash."""
    gateway: str
    bridge: Optional[str] = None
    bridge_created: bool = False
    addr: Optional[tuple[str, str, int]] = None    # (bridge, address, prefix) we added
    dhcp: Optional[dhcp.Dnsmasq] = None

    def to_json(self) -> dict:
        return {"gateway": self.gateway, "bridge": self.bridge,
                "bridge_created": self.bridge_created,
                "addr": list(self.addr) if self.addr else None,
                "dhcp": self.dhcp.to_json() if self.dhcp else None}

    @classmethod
    def from_json(cls, d: dict) -> "Plumbing":
        addr = d.get("addr")
        return cls(gateway=str(d["gateway"]), bridge=d.get("bridge"),
                   bridge_created=bool(d.get("bridge_created")),
                   addr=(str(addr[0]), str(addr[1]), int(addr[2])) if addr else None,
                   dhcp=dhcp.Dnsmasq.from_json(d["dhcp"]) if d.get("dhcp") else None)


def attach(spec: FanSpec, tun_index: int, overlay_mtu: int, run_dir: str) -> Plumbing:
    """Give the slice gateway a home (the bridge, or the TUN itself), route the overlay
    into the TUN, and start the bridge's dnsmasq for `dhcp`. On failure nothing stays."""
    m = spec.map
    rec = Plumbing(gateway=ip(m.gateway), bridge=spec.bridge)
    with IPRoute() as ipr:
        try:
            if spec.bridge:
                idx = link_index(ipr, spec.bridge)
                if idx is None:
                    ipr.link("add", ifname=spec.bridge, kind="bridge")
                    rec.bridge_created = True
                    idx = link_index(ipr, spec.bridge)
                ipr.link("set", index=idx, mtu=overlay_mtu, state="up")
                ipr.addr("add", index=idx, address=ip(m.gateway), prefixlen=m.slice_len)
                rec.addr = (spec.bridge, ip(m.gateway), m.slice_len)
            else:
                ipr.addr("add", index=tun_index, address=ip(m.gateway), prefixlen=32)
            ipr.route("add", dst=ip(m.overlay), dst_len=m.overlay_len, oif=tun_index,
                      prefsrc=ip(m.gateway))
        except NetlinkError as e:
            detach(rec)
            raise DeviceError(f"cannot set up {m.overlay_net}: "
                              f"{e.args[1] if len(e.args) > 1 else e}") from None
    if spec.dhcp and not spec.bridge:
        log.warning("%s: flag dhcp ignored: DHCP needs the fan on a bridge (add "
                    "'bridge NAME')", m.overlay_net)
    elif spec.dhcp:
        try:
            rec.dhcp = dhcp.start(spec, overlay_mtu, run_dir)
        except BaseException:
            detach(rec)
            raise
    return rec


def detach(rec: Plumbing) -> None:
    """Undo attach(). The route and a TUN address vanish with the TUN itself."""
    if rec.dhcp:
        dhcp.stop(rec.dhcp)
    if not rec.bridge:
        return
    with IPRoute() as ipr:
        idx = link_index(ipr, rec.bridge)
        if idx is None:
            return
        try:
            if rec.bridge_created:
                ipr.link("del", index=idx)
            elif rec.addr:
                _, addr, plen = rec.addr
                ipr.addr("del", index=idx, address=addr, prefixlen=plen)
        except NetlinkError as e:
            log.warning("could not remove %s from %s: %s", rec.addr, rec.bridge, e)


def enable_forwarding() -> str:
    with open(IP_FORWARD) as f:
        before = f.read().strip()
    with open(IP_FORWARD, "w") as f:
        f.write("1")
    return before


def restore_forwarding(before: str) -> None:
    with open(IP_FORWARD, "w") as f:
        f.write(before)


def nft_ruleset(specs: list[FanSpec]) -> str:
    """One table, replaced as a whole whenever the set of fans changes."""
    rules = [
        "  chain output {",
        "    type filter hook output priority 0; policy accept;",
        # The kernel answers protocol-4 datagrams with 'protocol unreachable' when no raw
        # socket takes them, and also when our socket's buffer is full: fanpkt owns IPIP
        # here, so those answers are always wrong. @th,136,8 is the quoted IP protocol.
        "    icmp type destination-unreachable icmp code prot-unreachable @th,136,8 4 drop",
        "  }",
    ]
    nat = [s for s in specs if s.nat]
    if nat:
        rules += ["  chain postrouting {",
                  "    type nat hook postrouting priority srcnat; policy accept;"]
        for s in nat:
            m = s.map
            rules.append(f"    ip saddr {ip(m.local_slice)}/{m.slice_len} "
                         f"ip daddr != {m.overlay_net} snat to {ip(m.host)}")
        rules.append("  }")
    body = "\n".join(rules)
    return f"{NFT_RESET}table ip {NFT_TABLE} {{\n{body}\n}}\n"


def _nft(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nft", "-f", "-"], input=script, text=True, capture_output=True,
                          timeout=30)


def nft_apply(specs: list[FanSpec]) -> None:
    if shutil.which("nft") is None:
        if any(s.nat for s in specs):
            raise FanError("the nat flag needs nftables (`apt-get install nftables`)")
        log.warning("nft not found: relying on a large socket buffer to keep the kernel from "
                    "answering IPIP with 'protocol unreachable'")
        return
    p = _nft(nft_ruleset(specs))
    if p.returncode:
        raise FanError(f"nft refused fanpkt's rules: {p.stderr.strip()}")


def nft_remove() -> None:
    if shutil.which("nft"):
        _nft(NFT_RESET)


def cleanup_leftovers(fans: list[Plumbing], ip_forward_before: Optional[str],
                      pid) -> None:
    """Remove what a crashed run left (its TUNs died with it; bridges, dnsmasq and rules
    did not)."""
    log.info("cleaning up after an earlier run (pid %s) that did not stop cleanly", pid)
    for rec in fans:
        detach(rec)
    nft_remove()
    if ip_forward_before is not None:
        restore_forwarding(ip_forward_before)
