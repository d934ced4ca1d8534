"""The host plumbing that needs no namespace (fanpkt/plumbing.py): the nftables ruleset
fanpkt installs, checked by `nft -c` where nft is installed, and the plumbing record a
crashed run leaves for the next one."""
from __future__ import annotations

import json
import subprocess

import pytest

from fanpkt import dhcp
from fanpkt.config import make_spec

from conftest import NoResolver
from fanpkt.plumbing import NFT_RESET, NFT_TABLE, Plumbing, nft_ruleset

# ICMP header (8 bytes), then the quoted IP header, whose protocol is its byte 9
QUOTED_PROTO_BITS = (8 + 9) * 8
DROP_PROT_UNREACH = ("icmp type destination-unreachable icmp code prot-unreachable "
                     f"@th,{QUOTED_PROTO_BITS},8 4 drop")


def spec(overlay, underlay, *flags):
    return make_spec(overlay, underlay, list(flags), NoResolver())


def chains(ruleset: str) -> dict:
    """The table's chains after the reset: name -> the lines inside it."""
    assert ruleset.startswith(NFT_RESET)
    lines = ruleset[len(NFT_RESET):].splitlines()
    assert lines[0] == f"table ip {NFT_TABLE} {{" and lines[-1] == "}"
    out, name = {}, None
    for line in lines[1:-1]:
        if line.startswith("  chain ") and line.endswith(" {"):
            name = line.split()[1]
            assert name not in out
            out[name] = []
        elif line == "  }":
            name = None
        else:
            assert name is not None, f"{line!r} outside any chain"
            out[name].append(line.strip())
    return out


NO_NAT = [spec("241.0.0.0/8", "172.16.3.4/16"),
          spec("100.64.0.0/10", "10.1.9.77/20", "bridge", "fanbr1", "dhcp")]
WITH_NAT = [spec("241.0.0.0/8", "172.16.3.4/16", "nat"),
            spec("250.0.0.0/8", "172.16.3.4/16"),
            spec("100.64.0.0/10", "10.1.9.77/20", "bridge", "fanbr1", "nat")]


def test_reset_replaces_the_whole_table():
    # created first, so that deleting it works whether or not it was there
    assert NFT_TABLE == "fanpkt"
    assert NFT_RESET == "table ip fanpkt {}\ndelete table ip fanpkt\n"


VXLAN_ONLY = [spec("241.0.0.0/8", "172.16.3.4/16", "type", "vxlan"),
              spec("250.0.0.0/8", "172.16.3.4/16", "type", "vxlan", "vni", "9")]


@pytest.mark.parametrize("specs", [NO_NAT, WITH_NAT, NO_NAT + VXLAN_ONLY[1:]],
                         ids=["no-nat", "nat", "ipip-and-vxlan"])
def test_output_chain_drops_prot_unreachable_about_ipip(specs):
    out = chains(nft_ruleset(specs))["output"]
    assert out == ["type filter hook output priority 0; policy accept;", DROP_PROT_UNREACH]


@pytest.mark.parametrize("specs", [[], VXLAN_ONLY], ids=["none", "vxlan"])
def test_no_ipip_no_output_chain(specs):
    """No IPIP fan, nothing to keep quiet: no hook on every packet the host sends."""
    assert chains(nft_ruleset(specs)) == {}


@pytest.mark.parametrize("specs", [[], NO_NAT], ids=["none", "no-nat"])
def test_no_nat_no_postrouting(specs):
    assert "postrouting" not in chains(nft_ruleset(specs))
    assert "snat" not in nft_ruleset(specs)


def test_nat_masquerades_the_slice_leaving_the_overlays():
    """Traffic to any of the host's overlays is never NATed: an underlay source would be
    dropped by the receiving fan's anti-spoofing check."""
    c = chains(nft_ruleset(WITH_NAT))
    assert list(c) == ["output", "postrouting"]
    assert c["postrouting"] == [
        "type nat hook postrouting priority srcnat; policy accept;",
        "ip saddr 241.3.4.0/24 ip daddr != { 241.0.0.0/8, 250.0.0.0/8, 100.64.0.0/10 } "
        "snat to 172.16.3.4",
        "ip saddr 100.101.52.0/22 ip daddr != { 241.0.0.0/8, 250.0.0.0/8, 100.64.0.0/10 } "
        "snat to 10.1.9.77",
    ]


def test_nat_source_is_the_whole_slice():
    """The whole slice, host reserve included, whatever its length (here /16)."""
    c = chains(nft_ruleset([spec("250.0.0.0/8", "10.0.0.37/24", "nat", "host-reserve", "9")]))
    assert c["postrouting"][1:] == [
        "ip saddr 250.37.0.0/16 ip daddr != { 250.0.0.0/8 } snat to 10.0.0.37"]


@pytest.mark.parametrize("specs", [[], NO_NAT, WITH_NAT, VXLAN_ONLY],
                         ids=["none", "no-nat", "nat", "vxlan"])
def test_nft_accepts_the_ruleset(specs):
    """`nft -c`: parsed and checked by the kernel, nothing changed."""
    p = subprocess.run(["nft", "-c", "-f", "-"], input=nft_ruleset(specs), text=True,
                       capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr      # tools/setup.sh installs nft; CI is root


# -- the plumbing record ---------------------------------------------------------------------
def round_trip(rec: Plumbing) -> Plumbing:
    return Plumbing.from_json(json.loads(json.dumps(rec.to_json())))


def test_plumbing_record_round_trip_tun_only():
    rec = Plumbing(gateway="241.3.4.1")
    j = rec.to_json()
    assert {k: j[k] for k in ("gateway", "bridge", "bridge_created", "addr", "dhcp")} == \
        {"gateway": "241.3.4.1", "bridge": None, "bridge_created": False, "addr": None,
         "dhcp": None}
    assert round_trip(rec) == rec
    assert Plumbing.from_json({"gateway": "241.3.4.1"}) == rec


def test_plumbing_record_round_trip_with_bridge_and_dnsmasq():
    d = dhcp.Dnsmasq(pid=4321, pid_file="/run/fanpkt/net-1/dhcp-fanbr0.pid",
                     lease_file="/run/fanpkt/net-1/dhcp-fanbr0.leases")
    rec = Plumbing(gateway="241.3.4.1", bridge="fanbr0", bridge_created=True,
                   addr=("fanbr0", "241.3.4.1", 24), dhcp=d)
    j = rec.to_json()
    assert j["addr"] == ["fanbr0", "241.3.4.1", 24]
    assert j["dhcp"] == {"pid": 4321, "pid_file": d.pid_file, "lease_file": d.lease_file}
    back = round_trip(rec)
    assert back == rec
    assert isinstance(back.addr, tuple) and isinstance(back.dhcp, dhcp.Dnsmasq)
    # a bridge that was there before: only our address is recorded
    kept = Plumbing(gateway="241.3.4.1", bridge="br0", addr=("br0", "241.3.4.1", 24))
    assert round_trip(kept) == kept and not round_trip(kept).bridge_created
