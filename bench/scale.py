"""Scale benchmark: a 32-host IPIP fan in namespaces (tests/test_scale.py's fan_mesh),
full-mesh reachability and every forwarder's RSS, written to scale.json and scale.md.

    sudo python3 bench/scale.py [--hosts 32] [--out bench/results]
"""
import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))     # the lab helpers
from lab import Lab  # noqa: E402
from test_scale import fan_mesh  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hosts", type=int, default=32)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--prefix", default=os.environ.get("FANPKT_TEST_NS", "fps"))
    args = ap.parse_args()
    lab = Lab(f"{args.prefix}scale-")
    try:
        result = fan_mesh(lab, args.hosts)
    finally:
        lab.close()
    rss = [kb for _, kb, _ in result.values()]
    unreached = {ns: u for ns, (u, _, _) in result.items() if u}
    report = {"hosts": args.hosts, "full_mesh": not unreached, "unreached": unreached,
              "rss_kb": {ns: kb for ns, (_, kb, _) in result.items()},
              "rss_kb_min": min(rss), "rss_kb_median": statistics.median(rss),
              "rss_kb_max": max(rss)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scale.json"), "w") as f:
        json.dump(report, f, indent=1)
    md = (f"# Scale: {args.hosts} hosts\n\nFull mesh: "
          f"{'every host reached every other' if not unreached else unreached}.\n\n"
          f"Forwarder RSS (one IPIP fan each): min {min(rss) / 1024:.1f} MB, median "
          f"{statistics.median(rss) / 1024:.1f} MB, max {max(rss) / 1024:.1f} MB.\n")
    with open(os.path.join(args.out, "scale.md"), "w") as f:
        f.write(md)
    print(md)
    return 0 if not unreached else 1


if __name__ == "__main__":
    sys.exit(main())
