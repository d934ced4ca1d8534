"""A VXLAN fan on the kernel path (fanpkt/kernelpath.py), for the tests: run in a host's
namespace (`ip netns exec NS python3 kernel_host.py OVERLAY UNDERLAY [FLAG ...]`), it
sets the fan up as the forwarder would (devices, bridge plumbing, programs), prints
"ready", then answers each line on stdin with the fan's counters as JSON; at the end of
stdin it takes the fan down again."""
import json
import sys
import tempfile

from fanpkt import plumbing
from fanpkt.config import KernelResolver, make_spec
from fanpkt.kernelpath import KernelPath


def main():
    overlay, underlay, *flags = sys.argv[1:]
    spec = make_spec(overlay, underlay, ["type", "vxlan", *flags], KernelResolver())
    kp = KernelPath(check_spoof="--no-spoof-check" not in flags)
    fan = kp.create(0, spec.map.device_name, spec.port, spec.vni_value, 1450)
    rec = plumbing.attach(spec, fan.index, 1450, tempfile.mkdtemp())
    try:
        kp.configure(fan, spec.map, rec.bridge_mac)
        print("ready", flush=True)
        for _ in sys.stdin:     # the fan's counters, and its port's (a VNI of no fan)
            counters = kp.counters(fan)
            for name, value in kp.port_counters().items():
                counters[name] += value
            print(json.dumps(counters), flush=True)
    finally:
        kp.stop()
        plumbing.detach(rec)


if __name__ == "__main__":
    main()
