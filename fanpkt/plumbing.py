"""Host plumbing around the data path (spec §5), with pyroute2 and nftables: addresses,
the overlay route, bridges, forwarding, NAT, and the rule that keeps the kernel quiet about
IPIP it has no tunnel for. Everything made here is recorded so that it can be removed,
by this run or, after a crash, by the next one.
"""
from __future__ import annotations

import logging
import shutil
import subprocess

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import dhcp
from .config import FanSpec
from .errors import DeviceError, FanError
from .fanmap import ip

log = logging.getLogger("fanpkt")
NFT_TABLE = "fanpkt"
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"


def _index(ipr: IPRoute, name: str):
    idx = ipr.link_lookup(ifname=name)
    return idx[0] if idx else None


def attach(spec: FanSpec, tun_index: int, overlay_mtu: int) -> dict:
    """Give the slice gateway a home (the bridge, or the TUN itself) and route the overlay
    into the TUN. Returns the record detach() needs."""
    m = spec.map
    rec = {"bridge": spec.bridge, "bridge_created": False, "gateway": ip(m.gateway)}
    with IPRoute() as ipr:
        try:
            if spec.bridge:
                idx = _index(ipr, spec.bridge)
                if idx is None:
                    ipr.link("add", ifname=spec.bridge, kind="bridge")
                    rec["bridge_created"] = True
                    idx = _index(ipr, spec.bridge)
                ipr.link("set", index=idx, mtu=overlay_mtu, state="up")
                ipr.addr("add", index=idx, address=ip(m.gateway), prefixlen=m.slice_len)
                rec["addr"] = [spec.bridge, ip(m.gateway), m.slice_len]
            else:
                ipr.addr("add", index=tun_index, address=ip(m.gateway), prefixlen=32)
            ipr.route("add", dst=ip(m.overlay), dst_len=m.overlay_len, oif=tun_index,
                      prefsrc=ip(m.gateway))
        except NetlinkError as e:
            detach(rec)
            raise DeviceError(f"cannot set up {m.overlay_net}: {e.args[1] if len(e.args) > 1 else e}"
                              ) from None
    return rec


def detach(rec: dict) -> None:
    """Undo attach() and the fan's dnsmasq. The route and a TUN address vanish with the
    TUN itself."""
    if rec.get("dhcp"):
        dhcp.stop(rec["dhcp"])
    with IPRoute() as ipr:
        bridge = rec.get("bridge")
        idx = _index(ipr, bridge) if bridge else None
        if idx is None:
            return
        try:
            if rec.get("bridge_created"):
                ipr.link("del", index=idx)
            elif rec.get("addr"):
                _, addr, plen = rec["addr"]
                ipr.addr("del", index=idx, address=addr, prefixlen=plen)
        except NetlinkError as e:
            log.warning("could not remove %s from %s: %s", rec.get("addr"), bridge, e)


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
    return (f"table ip {NFT_TABLE} {{}}\ndelete table ip {NFT_TABLE}\n"
            f"table ip {NFT_TABLE} {{\n{body}\n}}\n")


def nft_apply(specs: list[FanSpec]) -> None:
    if shutil.which("nft") is None:
        if any(s.nat for s in specs):
            raise FanError("the nat flag needs nftables (`apt-get install nftables`)")
        log.warning("nft not found: relying on a large socket buffer to keep the kernel from "
                    "answering IPIP with 'protocol unreachable'")
        return
    p = subprocess.run(["nft", "-f", "-"], input=nft_ruleset(specs), text=True,
                       capture_output=True, timeout=30)
    if p.returncode:
        raise FanError(f"nft refused fanpkt's rules: {p.stderr.strip()}")


def nft_remove() -> None:
    if shutil.which("nft"):
        subprocess.run(["nft", "-f", "-"], text=True, capture_output=True, timeout=30,
                       input=f"table ip {NFT_TABLE} {{}}\ndelete table ip {NFT_TABLE}\n")


def cleanup_leftovers(state: dict) -> None:
    """Remove what a crashed run left (its TUNs died with it; bridges and rules did not)."""
    log.info("cleaning up after an earlier run (pid %s) that did not stop cleanly",
             state.get("pid"))
    for fan in state.get("fans", []):
        if fan.get("plumbing"):
            detach(fan["plumbing"])
    nft_remove()
    if state.get("ip_forward_before") is not None:
        restore_forwarding(state["ip_forward_before"])
