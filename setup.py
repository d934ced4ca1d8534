"""Declares the one compiled module, fanpkt._fastpath, built from _fast/, and the eBPF
object of the kernel data path, fanpkt/fan_vxlan.bpf.o, built from
_fast/fan_vxlan.bpf.c with clang when clang and libbpf's headers are there (without
them the package builds, and VXLAN fans keep to the userspace engine).

FANPKT_DEBUG=1 builds with bounds checks and -O0 -g (asserts on); FANPKT_ASAN=1 adds
AddressSanitizer (run Python with LD_PRELOAD of libasan: tools/fuzz.sh --asan does);
force=True so that switching a flag really rebuilds.
"""
import ast
import os
import shutil
import subprocess

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

BPF_SOURCE = os.path.join("_fast", "fan_vxlan.bpf.c")
BPF_OBJECT = "fan_vxlan.bpf.o"

DEBUG = os.environ.get("FANPKT_DEBUG") == "1"
ASAN = ["-fsanitize=address", "-fno-omit-frame-pointer"] \
    if os.environ.get("FANPKT_ASAN") == "1" else []


def config_constant(name: str) -> int:
    """A constant of fanpkt/config.py, read without importing the package (which needs
    its dependencies): the one definition both the shell and the engine use."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fanpkt",
                           "config.py")) as f:
        for node in ast.parse(f.read()).body:
            if isinstance(node, ast.Assign) and \
                    [getattr(t, "id", None) for t in node.targets] == [name]:
                return int(ast.literal_eval(node.value))
    raise SystemExit(f"setup.py: fanpkt/config.py defines no {name}")


ext = Extension(
    "fanpkt._fastpath",
    ["_fast/fastpath.pyx"],
    include_dirs=["_fast"],
    # _fast/fanmap.pxd sizes its arrays by it
    define_macros=[("FANPKT_MAX_QUEUES", str(config_constant("MAX_QUEUES")))],
    extra_compile_args=(["-O0", "-g", "-UNDEBUG"] if DEBUG else ["-O3"]) + ASAN,
    extra_link_args=ASAN,
)


class BuildWithBpf(build_ext):
    """build_ext, then the eBPF object beside the compiled module."""

    def run(self):
        super().run()
        out = os.path.join("fanpkt" if self.inplace else
                           os.path.join(self.build_lib, "fanpkt"), BPF_OBJECT)
        clang = shutil.which("clang")
        if clang is None or not os.path.exists("/usr/include/bpf/bpf_helpers.h"):
            print("setup.py: clang or libbpf's headers missing: no kernel data path built")
            return
        # <asm/types.h> lives under the multiarch directory on Debian
        arch = subprocess.run(["gcc", "-print-multiarch"], capture_output=True,
                              text=True).stdout.strip()
        subprocess.run([clang, "-O2", "-g", "-Wall", "-Werror", "-target", "bpf",
                        *([f"-I/usr/include/{arch}"] if arch else []),
                        "-c", BPF_SOURCE, "-o", out], check=True)


directives = {"language_level": 3, "boundscheck": DEBUG, "wraparound": DEBUG,
              "initializedcheck": DEBUG, "cdivision": not DEBUG}
setup(ext_modules=cythonize([ext], compiler_directives=directives,
                            include_path=["_fast"], force=True),
      cmdclass={"build_ext": BuildWithBpf})
