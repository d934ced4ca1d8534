#!/usr/bin/env bash
# The wheel, as a user gets it: `python -m build` makes the sdist and, from that sdist, the
# wheel; both are checked for what they must hold; the wheel goes into a clean venv outside
# the checkout, and from outside the checkout that venv runs `fanpkt map`,
# `fanpkt-forward --help` and one ping between two fan hosts (network namespaces named
# ${FANPKT_TEST_NS:-fpt}whl-*, always deleted). Run by tools/test.sh, once; as root.
# Any failure prints what went wrong and exits non-zero.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ "$(id -u)" -ne 0 ]; then echo "tools/wheel-smoke.sh: run as root (netns)" >&2; exit 3; fi
work=$(mktemp -d /tmp/fanpkt-wheel.XXXXXX)
trap 'rm -rf "$work"' EXIT
fail() { echo "tools/wheel-smoke.sh: FAILED: $*" >&2; exit 1; }
# From outside the checkout: `python -m build` would otherwise import the checkout's
# build/ directory (setup.py's) as the module `build`, and `import fanpkt` its fanpkt/.
cd "$work"
# The sdist is made from a copy of the files git has (tracked, or new and not ignored), as
# a clean clone has them: building in the checkout would read its build products and the
# file list an earlier build left in fanpkt.egg-info, and hide a file MANIFEST.in misses.
mkdir src
(cd "$repo" && git ls-files -z -co --exclude-standard | xargs -0 sh -c \
  'for f; do [ ! -e "$f" ] || printf "%s\0" "$f"; done' sh) |
  tar -C "$repo" --null -T - -cf - | tar -C src -xf -
# the release build, whatever the caller's FANPKT_DEBUG
if ! env -u FANPKT_DEBUG python3 -m build --outdir dist src >build.log 2>&1; then
  cat build.log >&2
  fail "python -m build (log above)"
fi
sdist=$(ls dist/fanpkt-*.tar.gz) && wheel=$(ls dist/fanpkt-*.whl) || fail "no sdist or wheel"
tar tzf "$sdist" | sed 's|^[^/]*/||' | sort >sdist.txt
python3 -m zipfile -l "$wheel" | awk 'NR > 1 {print $1}' | sort >wheel.txt
for f in setup.py pyproject.toml MANIFEST.in README.md _fast/fastpath.pyx _fast/tx.pxi \
         _fast/rx.pxi _fast/vxlan.pxi _fast/linux.pxd _fast/fanmap.pxd fanpkt/cli.py \
         fanpkt/_fastpath.pyi fanpkt/py.typed tests/lab.py LICENSE CHANGELOG.md \
         CONTRIBUTING.md docs/spec.md docs/internals.md docs/performance.md; do
  grep -qx "$f" sdist.txt || fail "the sdist lacks $f"
done
# every Cython source of the checkout, and no build product
for f in $(cd "$repo" && git ls-files '_fast/*'); do
  grep -qx "$f" sdist.txt || fail "the sdist lacks $f"
done
# (the eBPF program's source is C, and source: *.bpf.c)
! grep -E '\.(so|c|o)$' sdist.txt | grep -v '\.bpf\.c$' ||
  fail "the sdist holds build products (above)"
grep -qE '^fanpkt/_fastpath\.cpython-.*\.so$' wheel.txt ||
  fail "the wheel lacks the compiled core"
for f in fanpkt/_fastpath.pyi fanpkt/py.typed fanpkt/cli.py fanpkt/fan_vxlan.bpf.o; do
  grep -qx "$f" wheel.txt || fail "the wheel lacks $f"
done
python3 - "$wheel" <<'EOF' || fail "the wheel lacks the fanpkt and fanpkt-forward commands"
import sys, zipfile
wheel = zipfile.ZipFile(sys.argv[1])
points = wheel.read(next(n for n in wheel.namelist() if n.endswith("/entry_points.txt")))
assert b"fanpkt = fanpkt.cli:main" in points, points
assert b"fanpkt-forward = fanpkt.cli:forward_main" in points, points
EOF

python3 -m venv venv
if ! venv/bin/python -m pip install -q "$wheel" >pip.log 2>&1; then
  cat pip.log >&2
  fail "pip install of the wheel into a clean venv (log above)"
fi
# Only the venv from here on: its python and scripts, PYTHONPATH unset.
export PATH="$work/venv/bin:$PATH"
unset PYTHONPATH
site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
where=$(python -c "import fanpkt; print(fanpkt.__file__)")
[ "$where" = "$site/fanpkt/__init__.py" ] || fail "fanpkt imported from $where, not the venv"
out=$(fanpkt map -o 241.0.0.0/8 -u 172.16.0.0/16 241.6.7.8) || fail "fanpkt map exited $?"
[ "$out" = "172.16.6.7" ] || fail "fanpkt map printed '$out', not 172.16.6.7"
fanpkt-forward --help | grep -q "usage: fanpkt-forward" || fail "fanpkt-forward --help"
# One ping between two fan hosts. tests/lab.py starts the forwarders with this python
# (`python -c 'from fanpkt.cli import forward_main ...'`), so the venv's fanpkt forwards;
# the check reads which compiled core each forwarder has mapped.
python - "$repo/tests" "$site" <<'EOF' || fail "the two-host ping with the installed wheel"
import os, sys
sys.path.insert(0, sys.argv[1])
from lab import Lab, ping, poll, sh  # noqa: E402
site = sys.argv[2]
lab = Lab(f"{os.environ.get('FANPKT_TEST_NS', 'fpt')}whl-")
try:
    hosts, procs = [], []
    for i in (1, 2):
        ns = lab.host(f"h{i}", f"172.16.{i}.1")
        procs.append(lab.forward(ns, "-o", "241.0.0.0/8", "-u", f"172.16.{i}.1/16"))
        hosts.append(ns)
    for p in procs:
        # ip netns exec -> python: the forwarder is the child of the process we started
        def core():
            kids = sh("pgrep", "-P", str(p.pid), check=False).stdout.split() + [str(p.pid)]
            maps = "".join(open(f"/proc/{k}/maps").read() for k in kids
                           if os.path.exists(f"/proc/{k}/maps"))
            return [ln.split()[-1] for ln in maps.splitlines() if "_fastpath" in ln]
        paths = poll(core, "no forwarder with the compiled core mapped")
        assert all(x.startswith(site + "/fanpkt/") for x in paths), paths
    r = ping(hosts[0], "241.2.1.1")
    assert r.returncode == 0, r.stdout + r.stderr
    print(r.stdout.strip().splitlines()[-2])
finally:
    lab.close()
    for log in lab.logs.values():
        os.unlink(log)
EOF
echo "wheel smoke test passed: $(basename "$sdist"), $(basename "$wheel") installed in a" \
  "clean venv; fanpkt from $site"
