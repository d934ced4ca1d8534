"""fanpkt/heap.py: with the mmap threshold fixed, a large buffer allocated after a larger
one was freed still gets its own mapping, instead of growing the heap it would fragment."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# In a child of its own: mallopt() is process-wide.
CHILD = r"""
import sys
from fanpkt import heap
if sys.argv[1] == "settle":
    assert heap.settle()
def heap_kb():
    size, inheap = 0, False
    for line in open("/proc/self/smaps"):
        f = line.split()
        if "-" in f[0] and not f[0].endswith(":"):
            inheap = line.rstrip().endswith("[heap]")
        elif inheap and f[0] == "Size:":
            size += int(f[1])
    return size
big = bytearray(4 << 20)    # like a reload's loop arena: mmapped, then freed
del big
before = heap_kb()
keep = [bytearray(512 << 10) for _ in range(4)]     # like netlink receive buffers
heap.trim()
print(heap_kb() - before)
"""


def heap_growth(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True,
                         text=True, cwd=ROOT, check=True)
    return int(out.stdout)


def test_large_buffers_keep_out_of_the_heap():
    assert heap_growth("default") >= 1024     # glibc's own way: the heap takes them
    assert heap_growth("settle") < 512      # not one of the 512 KiB buffers
