"""Command-line entry points: `fanpkt map|show|stats|up|down` and `fanpkt-forward`.

Errors are FanError subclasses: printed as one line, `fanpkt: <message>`, with the class's
exit status. Modules that need the compiled core (the forwarder) are imported inside that
handling, so a missing build is exit status 8, not a traceback. Anything else escaping is
a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys

from . import heap, privileges
from .config import (MAX_QUEUES, KernelResolver, check_table, make_spec, parse_file,
                     resolve_underlay)
from .errors import ConfigError, FanError
from .fanmap import FanMap, decimal, ip

FLAGS_HELP = ("Flags: dhcp, host-reserve N, bridge NAME, nat, off, type ipip|vxlan, vni N, "
              "port N, datapath auto|kernel|user.")


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors, which is our ConfigError status too."""

    def error(self, message):
        raise ConfigError(f"{self.prog}: {message}")


def path(text: str) -> str:
    """A file or directory name from the command line. A real argv always encodes back
    to bytes; a string with a lone surrogate or a NUL cannot name a file, so it is a usage
    error here rather than an exception at the first open()."""
    try:
        raw = os.fsencode(text)
    except UnicodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid file name") from None
    if not raw or b"\0" in raw:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid file name")
    return text


# -- fanpkt map ------------------------------------------------------------------------
def cmd_map(args) -> int:
    """Underlay host of overlay addresses, slice of underlay hosts; one answer a line."""
    m = FanMap.parse(args.overlay, resolve_underlay(args.underlay, KernelResolver()))
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
        overlay = m.in_overlay(a)
        host = m.dest(a) if overlay else a
        info: dict[str, object] = {"address": ip(a),
                                   "kind": "overlay" if overlay else "underlay"}
        if overlay:
            info["underlay_host"] = ip(host)
        info["routable"] = m.routable(host)
        if info["routable"]:
            info.update(m.slice_info(host))
            answer = ip(host) if overlay else info["slice"]
        else:
            print(f"fanpkt: {m.unroutable(a)}", file=sys.stderr)
            status = 1
            answer = "unroutable"
        info.update({"overlay": str(m.overlay_net), "underlay": str(m.underlay_net),
                     "device": m.device_name})
        print(json.dumps(info) if args.json else answer)
    return status


# -- fanpkt show / stats ---------------------------------------------------------------
def cmd_show(args) -> int:
    from .runstate import RunState
    state = RunState.find(args.run_dir).read_state()
    print(format_show(state))
    return 0


def show_flags(fan) -> list[str]:
    """A fan's flags as `fanpkt show` lists them: a VXLAN fan's 'datapath' is the one it
    runs on (kernel or user), not the one asked for (auto, the default, is never listed)."""
    if fan.type != "vxlan":
        return fan.flags
    flags = [f for f in fan.flags if not f.startswith("datapath ")]
    at = sum(f.startswith(("type ", "vni ", "port ")) for f in flags)     # where FanSpec puts it
    return flags[:at] + [f"datapath {fan.datapath}"] + flags[at:]


def format_show(state) -> str:
    """fanctl show's table: Bridge Underlay Overlay Flags."""
    rows = [("Bridge", "Underlay", "Overlay", "Flags")]
    for fan in state.fans:
        rows.append((fan.bridge or fan.device, fan.underlay, fan.overlay,
                     " ".join(show_flags(fan)) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def cmd_stats(args) -> int:
    from .runstate import RunState
    run = RunState.find(args.run_dir)
    if args.watch is not None:
        from .watch import seconds, watch
        if args.json or args.all:
            raise ConfigError(f"--watch prints rates as text; {'--json' if args.json else '--all'}"
                              f" takes one reading")
        return watch(run.read_counters, seconds(args.watch))
    if args.json and args.all:
        raise ConfigError("--json already holds every counter; give one of --json, --all")
    snap = run.read_counters()
    print(json.dumps(snap, indent=2) if args.json else
          format_stats_all(snap) if args.all else format_stats(snap))
    return 0


def fan_line(fan: dict, every: bool = False) -> str:
    """The fan and its flags; then the offloads its kernel did not take (docs/kernels.md),
    or with every, the offloads it took."""
    offloads = fan.get("offloads") or {}
    if every:
        extra = f"; offloads {' '.join(n for n, on in offloads.items() if on) or 'none'}" \
            if offloads else ""
    else:
        missing = [n for n, on in offloads.items() if not on]
        extra = f"; without {' '.join(missing)}" if missing else ""
    path = ", kernel path" if fan.get("datapath") == "kernel" else ""
    return (f"fan {fan['device']}: {fan['overlay']} {fan['type']}{path}"
            + "".join(f", {f}" for f in fan["flags"]
                      if not f.startswith(("type", "datapath"))) + extra)


def wrapped(label: str, items: dict[str, int], indent: str = "      ",
            width: int = 79) -> list[str]:
    """`label: name value, name value, ...` over as many lines as it takes."""
    lines, line = [], f"{indent}{label}:"
    for i, (name, value) in enumerate(items.items()):
        word = f" {name} {value:,}"
        if i and len(line) + len(word) + 1 > width:
            lines.append(line + ",")
            line = indent + " " * (len(label) + 1)
        elif i:
            line += ","
        line += word
    return lines + [line]


def format_stats(snap: dict) -> str:
    """For a person: per fan and direction its packets, bytes and drops, then only the
    drop reasons and paths (offloads, frames, ECN) that are not zero, named without their
    direction (under tx, `no_map` is drop_tx_no_map and `l2` tx_l2). A receive loop that
    serves several fans (every IPIP fan; the VXLAN fans of one port) cannot tell them
    apart: its counts show under the first of them listed, and the others point there."""
    from .counters import DIRECTIONS, human_bytes, summaries
    sums = summaries(snap)
    fans = snap.get("fans", [])
    lines = [f"fanpkt-forward pid {snap['pid']}"]

    def show(d: str, s) -> None:
        lines.append(f"  {d}  {s.packets:>14,} packets  {human_bytes(s.bytes):>9}  "
                     f"{s.drops:>,} dropped")
        if len(s.fans) > 1:
            lines.append(f"      one receive loop for {', '.join(s.fans)}: their "
                         f"packets together")
        # names without the direction the row already says: no_map is drop_tx_no_map
        if s.reasons:
            lines.extend(wrapped("drops", {n.split("_", 2)[2]: v
                                           for n, v in s.reasons.items()}))
        if s.paths:
            lines.extend(wrapped("paths", {n.split("_", 1)[1]: v for n, v in s.paths.items()}))

    shown: dict[tuple[str, str], str] = {}      # (label, direction) -> the fan it is under
    for fan in fans:
        dev = fan["device"]
        lines.append(fan_line(fan))
        for d in DIRECTIONS:
            key = next((k for k in sums if k[1] == d and dev in sums[k].fans), None)
            if key is None:
                lines.append(f"  {d}  nothing counted yet")
            elif key in shown:
                lines.append(f"  {d}  counted with {shown[key]} (one receive loop for "
                             f"{', '.join(sums[key].fans)})")
            else:
                show(d, sums[key])
                shown[key] = dev
        kernel = {k: v for k, v in snap.get("devices", {}).get(dev, {}).items() if v}
        if kernel:      # losses before fanpkt sees a packet, or after it wrote one
            lines.extend(wrapped(f"kernel at {dev}", kernel, indent="  "))
    for key in sorted(set(sums) - set(shown)):       # loops of no listed fan, if they counted
        s = sums[key]
        if s.packets or s.drops or s.paths:
            lines.append(f"loop for {', '.join(s.fans) or 'no fan'}:")
            show(key[1], s)
    return "\n".join(lines)


def format_stats_all(snap: dict) -> str:
    """`--all`: every counter, summed over all fans, by direction: transmit counters and
    drops, then receive."""
    lines = [f"fanpkt-forward pid {snap['pid']}"]
    for fan in snap.get("fans", []):
        lines.append(fan_line(fan, every=True))
    for direction in ("tx", "rx"):
        lines.append(f"{direction}:")
        for name, value in snap["total"].items():
            if name.startswith(direction) or name.startswith(f"drop_{direction}"):
                lines.append(f"  {name:28} {value}")
    devices = snap.get("devices", {})
    if devices:     # losses before fanpkt sees a packet, or after it wrote one
        lines.append("kernel, at the fan devices:")
        for dev, d in devices.items():
            lines.append(f"  {dev:28} tx_dropped {d['tx_dropped']}  rx_dropped "
                         f"{d['rx_dropped']}")
    return "\n".join(lines)


# -- fanpkt up / down ------------------------------------------------------------------
def cmd_up_down(args) -> int:
    """fanctl's up/down forms, sent to the running forwarder's control socket
    (fanpkt/control.py); the forwarder parses the fans, as it parses its config file."""
    import os

    from .control import request
    from .runstate import CONTROL_SOCKET, RunState
    opts = [w for k in ("type", "vni", "port", "datapath") if getattr(args, k, None) is not None
            for w in (k, getattr(args, k))]
    every = getattr(args, "every", False)
    if args.all or every or args.config:
        if args.overlay or args.underlay or args.words or opts or (args.all and every):
            raise ConfigError(f"{args.command} -a/-e take no fan, flags or other options")
        if not (args.all or every):
            raise ConfigError("-c FILE goes with -a")
        req = {"op": args.command, "every": True} if every else \
            {"op": args.command, "all": True,
             "config": os.path.abspath(args.config) if args.config else None}
    elif args.overlay or args.underlay:
        if args.command == "up" and not (args.overlay and args.underlay):
            raise ConfigError("give both -o OVERLAY and -u UNDERLAY")
        if not args.overlay or (args.command == "down" and args.words):
            raise ConfigError("down takes -o OVERLAY [-u UNDERLAY] and no flags")
        fan = [args.overlay] + ([args.underlay] if args.underlay else [])
        req = {"op": args.command, "fans": [fan + args.words + opts]}
    elif len(args.words) >= 2 and (args.command == "up" or len(args.words) == 2):
        req = {"op": args.command, "fans": [args.words + opts]}
    else:
        forms = ("-o OVERLAY -u UNDERLAY [flags], OVERLAY UNDERLAY [flags], or -a"
                 if args.command == "up" else
                 "-o OVERLAY [-u UNDERLAY], OVERLAY UNDERLAY, -a or -e")
        raise ConfigError(f"{args.command}: use {forms}")
    request(RunState.find(args.run_dir).file(CONTROL_SOCKET), req)
    return 0


def add_up_down(sub) -> None:
    up = sub.add_parser("up", help="bring up a fan in the running forwarder (runtime only)",
                        epilog="Forms: up -o 241.0.0.0/8 -u 172.16.3.4/16 [flags]; "
                               f"up 241.0.0.0/8 172.16.3.4/16 [flags]; up -a. {FLAGS_HELP}")
    down = sub.add_parser("down", help="take down fans of the running forwarder "
                                       "(runtime only)",
                          epilog="Forms: down -o 241.0.0.0/8 [-u 172.16.3.4/16]; "
                                 "down 241.0.0.0/8 172.16.3.4/16; down -a; down -e")
    for p in (up, down):
        p.add_argument("-o", "--overlay")
        p.add_argument("-u", "--underlay")
        p.add_argument("-a", "--all", action="store_true",
                       help="every non-'off' fan of the config file")
        p.add_argument("-c", "--config", type=path,
                       help="the file for -a (default: the forwarder's -c file, else "
                            "/etc/network/fan)")
        p.add_argument("--run-dir", type=path,
                       help="state directory of the forwarder (default: per netns)")
        p.add_argument("words", nargs="*", metavar="ARG", help="positional fanctl form")
        p.set_defaults(func=cmd_up_down)
    for k in ("type", "vni", "port", "datapath"):
        up.add_argument(f"--{k}", help=f"the flag '{k}' of the fan")
    down.add_argument("-e", "--every", action="store_true", help="every running fan")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fanpkt", description="Fan networking in userspace (IPIP and VXLAN).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    mp = sub.add_parser("map", help="map overlay addresses to underlay hosts and back")
    mp.add_argument("-o", "--overlay", required=True, help="overlay, e.g. 241.0.0.0/8 or 241")
    mp.add_argument("-u", "--underlay", required=True,
                    help="underlay, e.g. 172.16.0.0/16 or fanctl's 172.16.3.4/16")
    mp.add_argument("--json", action="store_true", help="print every derived value as JSON")
    mp.add_argument("addresses", nargs="+", metavar="ADDRESS")
    mp.set_defaults(func=cmd_map)
    sp = sub.add_parser("show", help="list the running fans (Bridge Underlay Overlay Flags)")
    sp.add_argument("--run-dir", type=path,
                    help="state directory of the forwarder (default: per netns)")
    sp.set_defaults(func=cmd_show)
    st = sub.add_parser("stats", help="live counters of the running forwarder: per fan and "
                                      "direction, packets, bytes, drops and what is not zero")
    st.add_argument("--json", action="store_true",
                    help="every counter of every loop, and which fans each loop counts for")
    st.add_argument("--all", action="store_true",
                    help="every counter, summed over the fans, by direction")
    st.add_argument("--watch", nargs="?", const="1", metavar="SECONDS",
                    help="packets/s, bytes/s and drops/s per fan, refreshed every SECONDS "
                         "(default 1) until Ctrl-C")
    st.add_argument("--run-dir", type=path,
                    help="state directory of the forwarder (default: per netns)")
    st.set_defaults(func=cmd_stats)
    add_up_down(sub)
    return p


# -- fanpkt-forward --------------------------------------------------------------------
def build_forward_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fanpkt-forward",
                description="Forward Fan overlay traffic over IPIP or VXLAN, in userspace.",
                epilog="Forms: fanpkt-forward -o 241.0.0.0/8 -u 172.16.3.4/16 [flags]; "
                       "fanpkt-forward 241.0.0.0/8 172.16.3.4/16 [flags]; "
                       f"fanpkt-forward -c /etc/network/fan. {FLAGS_HELP}")
    p.add_argument("-o", "--overlay")
    p.add_argument("-u", "--underlay")
    p.add_argument("-c", "--config", type=path, help="a file in /etc/network/fan format")
    p.add_argument("--type", choices=("ipip", "vxlan"),
                   help="the fan type (default ipip); vxlan is the fan LXD builds")
    p.add_argument("--vni", help="VXLAN network identifier (default: overlay address >> 8, "
                                 "LXD's: 15794176 for 241.0.0.0/8)")
    p.add_argument("--port", help="VXLAN UDP port (default 8472, the kernel's and LXD's)")
    p.add_argument("--datapath", choices=("auto", "kernel", "user"),
                   help="a VXLAN fan's data path: auto (the kernel path where it can be "
                        "set up, else the userspace engine; the default), kernel (the "
                        "kernel's vxlan driver, steered by eBPF) or user (the userspace "
                        "engine)")
    p.add_argument("--no-spoof-check", action="store_true",
                   help="accept IPIP whose inner source is not the sender's slice "
                        "(as the original kernel does)")
    p.add_argument("--underlay-send", choices=("frames", "ip"), default="frames",
                   help="frames (default): packets to underlay hosts the kernel has already "
                        "resolved go out as Ethernet frames through a packet socket, past the "
                        "host's IP output path (its OUTPUT/POSTROUTING firewall rules and "
                        "policy routes do not see them); ip: every packet through the "
                        "kernel's IP output path")
    p.add_argument("--run-dir", type=path,
                   help="state directory (default: per network namespace)")
    p.add_argument("--queues", metavar="N",
                   help=f"queues per TUN/TAP and receive loops per VXLAN port, each a "
                        f"thread (default: one per CPU, at most {MAX_QUEUES})")
    p.add_argument("--metrics", metavar="ADDR:PORT",
                   help="serve Prometheus metrics at http://ADDR:PORT/metrics (off by "
                        "default; e.g. 127.0.0.1:9477, reachable from this network "
                        "namespace only)")
    p.add_argument("words", nargs="*", metavar="ARG", help="positional fanctl form and flags")
    p.set_defaults(func=run_forward)
    return p


def run_forward(args) -> int:
    from .forwarder import Forwarder          # needs the compiled core: BuildError if not
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="fanpkt-forward: %(message)s")
    resolver = KernelResolver()
    load = None
    # --type/--vni/--port/--datapath are the flags 'type X', 'vni N', 'port N',
    # 'datapath X' of the one map given
    opts = [w for k in ("type", "vni", "port", "datapath") if getattr(args, k) is not None
            for w in (k, getattr(args, k))]
    if args.config:
        if args.overlay or args.underlay or args.words or opts:
            raise ConfigError("-c takes no map, flags or --type/--vni/--port/--datapath on "
                              "the command line as well (give them per line in the file)")
        path = args.config
        load = lambda: parse_file(path, resolver)  # noqa: E731
        specs = load()
    elif args.overlay or args.underlay:
        if not (args.overlay and args.underlay):
            raise ConfigError("give both -o OVERLAY and -u UNDERLAY")
        specs = [make_spec(args.overlay, args.underlay, args.words + opts, resolver)]
    elif len(args.words) >= 2:
        specs = [make_spec(args.words[0], args.words[1], args.words[2:] + opts, resolver)]
    else:
        raise ConfigError("no fan given: use -o OVERLAY -u UNDERLAY, OVERLAY UNDERLAY, "
                          "or -c /etc/network/fan")
    check_table(specs)
    fwd = Forwarder(specs, check_spoof=not args.no_spoof_check, run_dir=args.run_dir,
                    config_path=args.config, send_frames=args.underlay_send == "frames",
                    queues=decimal(args.queues, "--queues", 1, MAX_QUEUES)
                    if args.queues is not None else None)
    if args.metrics:
        from .metrics import Exporter       # prometheus_client only when asked for
        fwd.exporter = Exporter(args.metrics, fwd)  # binds now: before anything is set up
    fwd.handle_signals()
    heap.settle()           # before any loop thread: a reload must not grow the RSS
    fwd.start()
    if fwd.exporter is not None:
        fwd.exporter.start()
    privileges.drop()       # what a reload and the stop need, nothing more
    fwd.serve(load)
    return 0


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
    return run(argv, build_forward_parser)


if __name__ == "__main__":
    sys.exit(main())
