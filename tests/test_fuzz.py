"""The mutation fuzzer (tests/fuzz.py) in CI: a million packets through every path of
both fan types (UDP merging, multi-message receive bursts and transmit runs included),
engine against oracle, and hostile text through the parsers. tools/test.sh runs it on the
release build and again on the FANPKT_DEBUG=1 build (bounds checks). The seed is printed
and in every failure; FANPKT_FUZZ_SEED=<n> replays a run."""
from __future__ import annotations

from fuzz import PATHS, run_packets, run_parsers, seed_from_env

N_PACKETS = 1_000_000
N_PARSER_CASES = 3000
SEED = seed_from_env()


def test_fuzz_engine_against_oracle():
    print(f"fuzz seed: {SEED} (replay with FANPKT_FUZZ_SEED={SEED})")
    fz = run_packets(SEED, N_PACKETS)
    assert sum(fz.packets.values()) >= N_PACKETS and all(fz.packets[p] for p in PATHS)
    # The generators must reach what they are for, or the comparison proves little:
    # deliveries and sends on every path, hostile virtio headers refused, superpackets
    # split and merged.
    verdicts = {(path, v) for path, v, _ in fz.outcomes}
    assert {("decap", "VERDICT_DELIVER"), ("encap", "VERDICT_SEND"),
            ("encap", "VERDICT_ICMP"),
            ("vxlan_decap", "VERDICT_DELIVER"), ("vxlan_encap", "VERDICT_SEND"),
            ("transmit", "VERDICT_SEND"), ("transmit", "VERDICT_ICMP")} <= verdicts
    transmit_drops = {reason for path, _, reason in fz.outcomes if path == "transmit"}
    assert {"drop_tx_bad_offload", "drop_tx_malformed", "drop_tx_too_big"} <= transmit_drops
    assert fz.merged["receive"] > 1000 and fz.merged["vxlan_receive"] > 1000, fz.merged
    # UDP merged into UDP GSO writes on both receive paths; runs sent in UDP GSO sends
    assert min(fz.merged[k] for k in ("receive_udp", "vxlan_receive_udp",
                                      "transmit_run")) > 1000, fz.merged
    vxlan_drops = {reason for path, _, reason in fz.outcomes if path == "vxlan_decap"}
    assert {"DROP_RX_OUTER_DST", "DROP_RX_LOCAL_MAC", "DROP_RX_DHCP"} <= vxlan_drops


def test_fuzz_parsers(tmp_path):
    """Hostile /etc/network/fan lines and argv: a result or one FanError line, never
    another exception."""
    print(f"parser fuzz seed: {SEED} (replay with FANPKT_FUZZ_SEED={SEED})")
    assert run_parsers(SEED, N_PARSER_CASES, str(tmp_path)) == N_PARSER_CASES
