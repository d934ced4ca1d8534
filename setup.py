"""Declares the one compiled module, fanpkt._fastpath, built from _fast/.

FANPKT_DEBUG=1 builds with bounds checks and -O0 -g (asserts on); FANPKT_ASAN=1 adds
AddressSanitizer (run Python with LD_PRELOAD of libasan: tools/fuzz.sh --asan does);
force=True so that switching a flag really rebuilds.
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FANPKT_DEBUG") == "1"
ASAN = ["-fsanitize=address", "-fno-omit-frame-pointer"] \
    if os.environ.get("FANPKT_ASAN") == "1" else []

ext = Extension(
    "fanpkt._fastpath",
    ["_fast/fastpath.pyx"],
    include_dirs=["_fast"],
    extra_compile_args=(["-O0", "-g", "-UNDEBUG"] if DEBUG else ["-O3"]) + ASAN,
    extra_link_args=ASAN,
)
directives = {"language_level": 3, "boundscheck": DEBUG, "wraparound": DEBUG,
              "initializedcheck": DEBUG, "cdivision": not DEBUG}
setup(ext_modules=cythonize([ext], compiler_directives=directives,
                            include_path=["_fast"], force=True))
