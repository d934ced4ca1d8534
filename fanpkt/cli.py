"""Command-line entry points: `fanpkt map|show|stats` and `fanpkt-forward`.

Errors are FanError subclasses: printed as one line, `fanpkt: <message>`, with the class's
exit status. Anything else escaping is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import sys

from .errors import ConfigError, FanError
from .fanmap import FanMap, ip


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors, which is our ConfigError status too."""

    def error(self, message):
        raise ConfigError(f"{self.prog}: {message}")


def _resolver():
    from .config import KernelResolver
    return KernelResolver()


def _map_from_args(overlay: str, underlay: str) -> FanMap:
    from .config import parse_overlay, resolve_underlay
    return FanMap.parse(parse_overlay(overlay), resolve_underlay(underlay, _resolver()))


def cmd_map(args) -> int:
    """Underlay host of overlay addresses, slice of underlay hosts; one answer a line."""
    m = _map_from_args(args.overlay, args.underlay)
    addrs = []
    for text in args.addresses:
        try:
            a = int(ipaddress.IPv4Address(text))
        except ValueError:
            raise ConfigError(f"{text!r} is not an IPv4 address") from None
        if not (m.in_overlay(a) or m.in_underlay(a)):
            raise ConfigError(f"{text} is inside neither overlay {m.overlay_net} "
                              f"nor underlay {m.underlay_net}")
        addrs.append(a)
    status = 0
    for a in addrs:
        if m.in_overlay(a):
            host = m.dest(a)
            ok = m.routable(host)
            info = {"address": ip(a), "kind": "overlay", "underlay_host": ip(host),
                    "routable": ok}
            if ok:
                info.update(m.slice_info(host))
            answer = ip(host)
        else:
            host = a
            ok = m.routable(host)
            info = {"address": ip(a), "kind": "underlay", "routable": ok}
            if ok:
                info.update(m.slice_info(host))
            answer = info.get("slice")
        info.update({"overlay": str(m.overlay_net), "underlay": str(m.underlay_net),
                     "device": m.device_name})
        if not ok:
            what = "network" if host == m.underlay else "broadcast"
            print(f"fanpkt: {ip(a)}: underlay host {ip(host)} is the underlay {what} "
                  f"address: unroutable", file=sys.stderr)
            status = 1
            answer = "unroutable"
        print(json.dumps(info) if args.json else answer)
    return status


def cmd_show(args) -> int:
    from .runstate import RunState
    state = RunState.find(args.run_dir).read_state()
    rows = [("Bridge", "Underlay", "Overlay", "Flags")]
    for fan in state["fans"]:
        rows.append((fan["bridge"] or fan["device"], fan["underlay"], fan["overlay"],
                     " ".join(fan["flags"]) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_stats(args) -> int:
    from .runstate import RunState
    run = RunState.find(args.run_dir)
    snap = run.read_counters()
    if args.json:
        print(json.dumps(snap, indent=2))
        return 0
    print(f"fanpkt-forward pid {snap['pid']}")
    for direction in ("tx", "rx"):
        print(f"{direction}:")
        for name, value in snap["total"].items():
            if name.startswith(direction) or name.startswith(f"drop_{direction}"):
                print(f"  {name:28} {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fanpkt", description="Fan networking in userspace (IPIP).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    mp = sub.add_parser("map", help="map overlay addresses to underlay hosts and back")
    mp.add_argument("-o", "--overlay", required=True, help="overlay, e.g. 241.0.0.0/8 or 241")
    mp.add_argument("-u", "--underlay", required=True,
                    help="underlay, e.g. 172.16.0.0/16 or fanctl's 172.16.3.4/16")
    mp.add_argument("--json", action="store_true", help="print every derived value as JSON")
    mp.add_argument("addresses", nargs="+", metavar="ADDRESS")
    mp.set_defaults(func=cmd_map)
    sp = sub.add_parser("show", help="list the running fans (Bridge Underlay Overlay Flags)")
    sp.add_argument("--run-dir", help="state directory of the forwarder (default: per netns)")
    sp.set_defaults(func=cmd_show)
    st = sub.add_parser("stats", help="live counters of the running forwarder")
    st.add_argument("--json", action="store_true")
    st.add_argument("--run-dir", help="state directory of the forwarder (default: per netns)")
    st.set_defaults(func=cmd_stats)
    return p


def run(argv, parser_factory) -> int:
    try:
        args = parser_factory().parse_args(argv)
        return args.func(args)
    except FanError as e:
        print(f"fanpkt: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        return 130


def main(argv=None) -> int:
    return run(argv, build_parser)


def forward_main(argv=None) -> int:
    from .forwarder import build_parser as forward_parser
    return run(argv, forward_parser)


if __name__ == "__main__":
    sys.exit(main())
