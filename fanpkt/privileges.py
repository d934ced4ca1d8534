"""Least privilege for the running forwarder: once its fans are up, it keeps only the
capabilities a reload (or a runtime `fanpkt up`) and the stop still need, and sets
no_new_privs, so that a flaw in the long-running process, or in anything it starts, cannot
use the rest of root's power.

Python's standard library has no capset(2); the two system calls are made through
ctypes (libcap-ng's Python binding is not on PyPI). What each kept capability is for is
listed in KEEP, and tools/fanpkt-forward.service repeats it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("fanpkt")

# <linux/capability.h>
CAP_CHOWN, CAP_KILL, CAP_SETGID, CAP_SETUID, CAP_SETPCAP = 0, 5, 6, 7, 8
CAP_NET_BIND_SERVICE, CAP_NET_ADMIN, CAP_NET_RAW = 10, 12, 13
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# <linux/prctl.h>
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 24, 38, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

KEEP = {
    CAP_NET_ADMIN: "TUN/TAP devices, addresses, routes, bridges, nftables (reload, stop)",
    CAP_NET_RAW: "raw and packet sockets for fans and VXLAN ports added by a reload",
    CAP_NET_BIND_SERVICE: "dnsmasq binds DHCP's port 67 for a fan added with dhcp",
    CAP_SETUID: "dnsmasq drops to the user nobody",
    CAP_SETGID: "... and to its group",
    CAP_KILL: "ending dnsmasq once it runs as nobody",
}


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def status_mask(field: str, pid: str = "self") -> int:
    """A capability set from /proc/PID/status (CapEff, CapPrm, CapBnd, ...), as a mask."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1], 16)
    raise LookupError(field)


def has_net_caps() -> bool:
    """Effective CAP_NET_ADMIN and CAP_NET_RAW: what TUN, routes and raw sockets need
    (root normally has them; a container or setpriv may have taken them away)."""
    try:
        eff = status_mask("CapEff")
    except (OSError, LookupError):
        return os.geteuid() == 0
    return all(eff >> c & 1 for c in (CAP_NET_ADMIN, CAP_NET_RAW))


def keep_mask() -> int:
    return sum(1 << c for c in KEEP)


def drop() -> bool:
    """Keep only KEEP, in every set of this process (bounding set included, so nothing it
    starts gets more), and set no_new_privs. Returns False, with one warning, if the kernel
    refused (a seccomp filter, say): the forwarder runs on with what it had."""
    libc = _libc()
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]
    try:
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
        libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)  # absent before 4.3
        # The bounding set first: dropping from it needs CAP_SETPCAP, which capset removes.
        for cap in range(_last_cap() + 1):
            if cap not in KEEP and libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                err = ctypes.get_errno()
                if err != 22:           # EINVAL: a capability this kernel does not know
                    raise OSError(err, f"PR_CAPBSET_DROP {cap}")
        permitted = status_mask("CapPrm") & keep_mask()
        header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_Data * 2)()
        for i in range(2):
            data[i].effective = data[i].permitted = (permitted >> (32 * i)) & 0xFFFFFFFF
            data[i].inheritable = 0
        if libc.syscall(_SYS_CAPSET, ctypes.byref(header), data) != 0:
            raise OSError(ctypes.get_errno(), "capset")
    except OSError as e:
        log.warning("could not drop capabilities (%s: %s); running with those it had",
                    e.strerror or os.strerror(e.errno or 0), e.filename or e.args[-1])
        return False
    log.info("capabilities dropped to %s; no_new_privs set",
             ", ".join(_NAMES[c] for c in sorted(KEEP)))
    return True


_SYS_CAPSET = {"x86_64": 126, "aarch64": 91, "armv7l": 185, "armv6l": 185, "i686": 185,
               "ppc64le": 184, "s390x": 185, "riscv64": 91}.get(os.uname().machine, 126)
_NAMES = {CAP_NET_ADMIN: "CAP_NET_ADMIN", CAP_NET_RAW: "CAP_NET_RAW",
          CAP_NET_BIND_SERVICE: "CAP_NET_BIND_SERVICE", CAP_SETUID: "CAP_SETUID",
          CAP_SETGID: "CAP_SETGID", CAP_KILL: "CAP_KILL"}
