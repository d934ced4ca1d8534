"""Per-packet costs and engine/oracle ratios from a pytest-benchmark JSON file."""
import json
import sys
from collections import defaultdict


def main(path):
    data = json.load(open(path))
    rows = defaultdict(dict)
    print("| group | benchmark | size | ns/packet (median) | Mpps |")
    print("|---|---|---|---|---|")
    for b in data["benchmarks"]:
        n = b["extra_info"].get("packets", 1)
        size = b["extra_info"].get("size", "")
        ns = b["stats"]["median"] / n * 1e9
        name = b["name"].split("[")[0].replace("test_", "")
        rows[(b["group"], size)][name] = ns
        print(f"| {b['group']} | {name} | {size} | {ns:.1f} | {1e3 / ns:.1f} |")
    print()
    for (group, size), r in sorted(rows.items(), key=str):
        eng = r.get(f"{group}_engine")
        orc = r.get(f"{group}_oracle") or r.get(f"{group}_python_scalar")
        if eng and orc:
            print(f"{group} {size}: engine is {orc / eng:.0f}x the oracle")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/micro.json")
