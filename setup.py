"""Declares the one compiled module, fanpkt._fastpath, built from _fast/.

FANPKT_DEBUG=1 builds with bounds checks and -O0 -g (asserts on);
force=True so that switching the flag really rebuilds.
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FANPKT_DEBUG") == "1"

ext = Extension(
    "fanpkt._fastpath",
    ["_fast/fastpath.pyx"],
    include_dirs=["_fast"],
    extra_compile_args=["-O0", "-g", "-UNDEBUG"] if DEBUG else ["-O3"],
)
directives = {"language_level": 3, "boundscheck": DEBUG, "wraparound": DEBUG,
              "initializedcheck": DEBUG, "cdivision": not DEBUG}
setup(ext_modules=cythonize([ext], compiler_directives=directives,
                            include_path=["_fast"], force=True))
