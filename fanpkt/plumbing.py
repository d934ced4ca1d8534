"""Host plumbing around the data path (docs/internals.md §5, docs/spec.md §6), with pyroute2 and
nftables: addresses, the overlay route, bridges, the bridge's dnsmasq, forwarding, NAT,
and the rule that keeps the kernel quiet about IPIP it has no tunnel for. Everything made
here is recorded (Plumbing) so that it can be removed, by this run or, after a crash, by
the next.

IPIP (fanctl's layout): the gateway slice.1 with the slice's prefix on the bridge, or as
/32 on the TUN; the route O/o into the TUN. VXLAN (LXD's layout): the gateway with the
*overlay's* prefix on the bridge, so the whole overlay is on-link and hosts ARP for every
overlay address; the TAP is a port of that bridge. A bridge fanpkt creates for a VXLAN fan
gets a MAC derived from the overlay and the host's underlay address: unique per host (two
hosts with one bridge MAC break host-to-fan traffic) and the same at every restart. A bridge
that already holds the gateway (an LXD-managed bridge with ipv4.address) is joined as it
is: the address stays its owner's, and fanpkt removes only what it added.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Optional

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import dhcp
from .config import FanSpec
from .errors import DeviceError, FanError, NotABridge
from .fanmap import ip
from .netlink import disable_ipv6, link_index, link_kind

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
    bridge_mac: str = ""        # VXLAN: the bridge's MAC (frames from it are our own)

    def to_json(self) -> dict:
        return {"gateway": self.gateway, "bridge": self.bridge,
                "bridge_created": self.bridge_created,
                "addr": list(self.addr) if self.addr else None,
                "dhcp": self.dhcp.to_json() if self.dhcp else None,
                "bridge_mac": self.bridge_mac}

    @classmethod
    def from_json(cls, d: dict) -> "Plumbing":
        addr = d.get("addr")
        return cls(gateway=str(d["gateway"]), bridge=d.get("bridge"),
                   bridge_created=bool(d.get("bridge_created")),
                   addr=(str(addr[0]), str(addr[1]), int(addr[2])) if addr else None,
                   dhcp=dhcp.Dnsmasq.from_json(d["dhcp"]) if d.get("dhcp") else None,
                   bridge_mac=str(d.get("bridge_mac") or ""))


def bridge_mac(spec: FanSpec) -> str:
    """02:<first overlay octet>:<the host's underlay address>: locally administered,
    unicast, unique per host in a fan, stable across restarts."""
    return ":".join(f"{b:02x}" for b in (0x02, spec.map.overlay >> 24,
                                         *spec.map.host.to_bytes(4, "big")))


def holds_address(ipr: IPRoute, index: int, address: str, prefixlen: int) -> bool:
    """Whether link `index` already has address/prefixlen (the pair the kernel refuses
    to add twice)."""
    return any(a.get_attr("IFA_LOCAL") == address and a["prefixlen"] == prefixlen
               for a in ipr.get_addr(family=socket.AF_INET, index=index))


def attach(spec: FanSpec, dev_index: int, overlay_mtu: int, run_dir: str) -> Plumbing:
    """Give the slice gateway a home (the bridge, or an IPIP fan's TUN itself), route an
    IPIP overlay into the TUN or make a VXLAN fan's TAP a port of its bridge, and start
    the bridge's dnsmasq for `dhcp`. On failure nothing stays."""
    m = spec.map
    bridge = spec.bridge_name
    rec = Plumbing(gateway=ip(m.gateway), bridge=bridge)
    with IPRoute() as ipr:
        try:
            if bridge:
                idx = link_index(ipr, bridge)
                if idx is None:
                    ipr.link("add", ifname=bridge, kind="bridge")
                    rec.bridge_created = True
                    idx = link_index(ipr, bridge)
                    disable_ipv6(bridge)
                    if spec.vxlan:
                        ipr.link("set", index=idx, address=bridge_mac(spec))
                elif link_kind(ipr, idx) != "bridge":
                    raise NotABridge(f"{bridge} exists and is not a bridge: name a bridge "
                                      f"(or a free name) with 'bridge NAME'")
                ipr.link("set", index=idx, mtu=overlay_mtu, state="up")
                plen = m.overlay_len if spec.vxlan else m.slice_len
                if holds_address(ipr, idx, ip(m.gateway), plen):
                    # the bridge's owner put the gateway there (LXD's ipv4.address):
                    # the same state, and it stays theirs when fanpkt stops
                    log.info("%s already holds %s/%d: joining it", bridge, ip(m.gateway),
                             plen)
                else:
                    ipr.addr("add", index=idx, address=ip(m.gateway), prefixlen=plen)
                    rec.addr = (bridge, ip(m.gateway), plen)
                if spec.vxlan:
                    if not rec.bridge_created:
                        pin_mac(ipr, idx)
                    ipr.link("set", index=dev_index, master=idx, state="up")
                    wire_port(ipr, dev_index)
                    rec.bridge_mac = ipr.get_links(idx)[0].get_attr("IFLA_ADDRESS")
            else:
                ipr.addr("add", index=dev_index, address=ip(m.gateway), prefixlen=32)
            if not spec.vxlan:
                ipr.route("add", dst=ip(m.overlay), dst_len=m.overlay_len, oif=dev_index,
                          prefsrc=ip(m.gateway))
        except NetlinkError as e:
            detach(rec)
            raise DeviceError(f"cannot set up {m.overlay_net}: "
                              f"{e.args[1] if len(e.args) > 1 else e}") from None
        except DeviceError:
            detach(rec)
            raise
    if spec.dhcp and not bridge:
        log.warning("%s: flag dhcp ignored: DHCP needs the fan on a bridge (add "
                    "'bridge NAME')", m.overlay_net)
    elif spec.dhcp:
        try:
            rec.dhcp = dhcp.start(spec, overlay_mtu, run_dir)
        except BaseException:
            detach(rec)
            raise
    return rec


def pin_mac(ipr, idx: int) -> None:
    """Give a bridge its own MAC as set by hand: a bridge whose MAC was never set takes
    its lowest port's and changes it whenever a port joins or leaves, which would leave
    V3's check (a frame from our own bridge) and the peers' ARP caches for slice.1 on a
    MAC the bridge no longer has. A set MAC stays (after the fan too: it is the MAC the
    bridge had)."""
    ipr.link("set", index=idx, address=ipr.get_links(idx)[0].get_attr("IFLA_ADDRESS"))


def wire_port(ipr, tap_index: int) -> None:
    """The TAP's bridge port, facing the wire: no learning, so a remote frame can neither
    move a local container's MAC to the TAP nor grow the bridge's forwarding database
    without bound (every source MAC a peer sends would be an entry); unknown unicast
    flooded to it, so that frames to remote MACs, never learnt, still reach the TAP
    (they reach the local ports too, as the bridge floods any unknown destination)."""
    ipr.brport("set", index=tap_index, learning=0, unicast_flood=1)


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
        if link_kind(ipr, idx) != "bridge":     # attach() only ever used a bridge
            log.warning("%s is no longer a bridge: left alone", rec.bridge)
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
    """One table, replaced as a whole whenever the set of fans changes. It hooks only what
    the fans need: every packet the host sends crosses a hooked chain, at a cost the
    kernel's own fan does not pay (for VXLAN-only hosts without nat, the table is empty)."""
    rules = []
    if any(not s.vxlan for s in specs):
        rules += [
            "  chain output {",
            "    type filter hook output priority 0; policy accept;",
            # The kernel answers protocol-4 datagrams with 'protocol unreachable' when no
            # raw socket takes them, and also when our socket's buffer is full: fanpkt owns
            # IPIP here, so those answers are always wrong. @th,136,8 is the quoted IP
            # protocol.
            "    icmp type destination-unreachable icmp code prot-unreachable @th,136,8 4 "
            "drop",
            "  }",
        ]
    nat = [s for s in specs if s.nat]
    if nat:
        rules += ["  chain postrouting {",
                  "    type nat hook postrouting priority srcnat; policy accept;"]
        # Overlay-to-overlay is never NATed, into this fan or any other of this host's:
        # the receiver's anti-spoofing would drop an underlay source.
        overlays = ", ".join(str(s.map.overlay_net) for s in specs)
        for s in nat:
            m = s.map
            rules.append(f"    ip saddr {ip(m.local_slice)}/{m.slice_len} "
                         f"ip daddr != {{ {overlays} }} snat to {ip(m.host)}")
        rules.append("  }")
    body = "".join(line + "\n" for line in rules)
    return f"{NFT_RESET}table ip {NFT_TABLE} {{\n{body}}}\n"


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


def _ifname_ok(name) -> bool:
    return (isinstance(name, str) and 0 < len(name) <= 15 and name.isascii()
            and name.isprintable() and not any(c in name for c in "/: ") and name not in
            (".", ".."))


def leftover_problem(d, run_dir: str) -> Optional[str]:
    """Why a crashed run's plumbing record d (JSON) is not one fanpkt would have written,
    or None. The record is root's to act on but sits in a file: before anything it names
    is deleted, ended or unlinked, it must name only what attach() itself creates - a
    bridge by a valid name, an IPv4 address on it, a dnsmasq whose files are the ones
    dhcp.command() puts in this run directory."""
    try:
        rec = Plumbing.from_json(d)
        ipaddress.IPv4Address(rec.gateway)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        return f"malformed ({e.__class__.__name__}: {e})"
    if rec.bridge is not None and not _ifname_ok(rec.bridge):
        return f"bridge name {rec.bridge!r} is no interface name"
    if rec.addr is not None:
        try:
            ipaddress.IPv4Address(rec.addr[1])
        except ValueError:
            return f"address {rec.addr[1]!r} is not IPv4"
        if rec.addr[0] != rec.bridge or rec.addr[1] != rec.gateway or not 0 < rec.addr[2] <= 32:
            return f"address {rec.addr} is not its gateway on its bridge"
    if rec.dhcp is not None:
        base = os.path.join(os.path.abspath(run_dir), f"dhcp-{rec.bridge}")
        if (rec.bridge is None or rec.dhcp.pid_file != base + ".pid"
                or rec.dhcp.lease_file != base + ".leases" or rec.dhcp.pid <= 1):
            return (f"dnsmasq record {rec.dhcp} is not this run directory's "
                    f"({base}.pid, {base}.leases)")
    return None


def cleanup_leftovers(records: list, ip_forward_before, pid, run_dir: str) -> None:
    """Remove what a crashed run left (its TUNs died with it; bridges, dnsmasq and rules
    did not). records are the plumbing records (JSON) of its state file: each is checked
    first (leftover_problem), and one that fails the check is left alone, with a warning."""
    log.info("cleaning up after an earlier run (pid %s) that did not stop cleanly", pid)
    for d in records:
        why = leftover_problem(d, run_dir)
        if why:
            log.warning("the earlier run's record %s: %s; not acting on it", d, why)
            continue
        detach(Plumbing.from_json(d))
    nft_remove()
    if ip_forward_before in ("0", "1"):
        restore_forwarding(ip_forward_before)
    elif ip_forward_before is not None:
        log.warning("the earlier run's ip_forward value %r is not 0 or 1: left as it is",
                    ip_forward_before)
