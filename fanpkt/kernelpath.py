"""The kernel data path of VXLAN fans: the one door to the eBPF object
(fanpkt/fan_vxlan.bpf.o, built from _fast/fan_vxlan.bpf.c) and the devices it runs on.

Per UDP port, one stock flow-based vxlan device, `fanvx-PORT`: the kernel's vxlan driver
encapsulates and decapsulates, in the fan's own wire format. The port's first fan has that
device as its bridge's port, as the kernel's own bridged vxlan would: the programs steer,
check and count, and the frame goes on with no redirect (a fan "direct" on its port). Each
further fan on the port has a veth pair whose end `fan-O` (the name the userspace engine
gives its TAP) is its bridge's port and whose other end `fanp-O` only keeps it up; the
programs redirect between fan-O and the shared vxlan device by VNI. The object's two
programs (fan_tx on each fan's port's tc egress, fan_rx on the vxlan device's tc ingress)
count in a per-CPU array map, one row per fan slot, under the userspace engine's counter
names.

Loaded with libbpf (libbpf.so.1, through ctypes): the loader the kernel's own tools use,
present wherever iproute2 is, and the one that understands the object's BTF-defined
maps. pyroute2 attaches the programs (clsact, cls_bpf direct-action) and makes the
devices. Attached programs outlive this process: after a crash the fans keep forwarding,
and the next start removes the devices (and so the programs) and sets them up anew.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, cast

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .counters import kind
from .datapath import DataPath, Fan
from .engine import COUNTER_NAMES
from .errors import FanError
from .netlink import disable_ipv6, link_index
from .runstate import tx_block

if TYPE_CHECKING:
    from .config import FanSpec
    from .runstate import Counters, FanState

log = logging.getLogger("fanpkt")

# The eBPF object the build put beside this module; FANPKT_BPF_OBJECT names another
# (a build of one's own, or none at all: a path with no file makes the kernel path
# unavailable, which `auto` then falls back from).
OBJECT = os.environ.get("FANPKT_BPF_OBJECT") or \
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "fan_vxlan.bpf.o")
MAX_FANS = 32               # MAX_FANS of the object
# enum kcounter of _fast/fan_vxlan.bpf.c, in its order: the userspace engine's names
KERNEL_COUNTERS = [
    "tx_packets", "tx_bytes", "drop_tx_malformed", "drop_tx_ethertype", "drop_tx_no_map",
    "drop_tx_unroutable", "drop_tx_to_self", "drop_tx_send_error",
    "rx_packets", "rx_bytes", "drop_rx_bad_vxlan", "drop_rx_unknown_vni",
    "drop_rx_src_not_underlay", "drop_rx_outer_dst", "drop_rx_bad_inner",
    "drop_rx_bad_inner_csum", "drop_rx_own_mac", "drop_rx_local_mac", "drop_rx_dhcp",
    "drop_rx_not_local",
    "drop_rx_spoofed_src",
]
NO_FAN = MAX_FANS           # the counter row of drops that belong to no fan
TC_EGRESS, TC_INGRESS = "ffff:fff3", "ffff:fff2"
# struct fan_conf: 12 u32 (overlay .. check_spoof), the bridge MAC, 2 bytes of padding
FAN_CONF = struct.Struct("=12I6s2x")


class KernelPathError(FanError):
    """The kernel path cannot be set up here (the reason is one line)."""
    exit_status = 4


def vxlan_device(port: int) -> str:
    return f"fanvx-{port}"


def peer_device(port_device: str) -> str:
    """fan-241 -> fanp-241: the veth end that keeps the bridge port up."""
    return "fanp-" + port_device[len("fan-"):]


class _Libbpf:
    """The few libbpf calls used, declared once."""

    def __init__(self):
        path = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            lib = ctypes.CDLL(path, use_errno=True)
        except OSError as e:
            raise KernelPathError(f"libbpf is not installed ({e})") from None
        p, i, c = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
        for name, res, args in [
                ("bpf_object__open_file", p, [c, p]), ("bpf_object__load", i, [p]),
                ("bpf_object__close", None, [p]),
                ("bpf_object__find_program_by_name", p, [p, c]),
                ("bpf_program__fd", i, [p]), ("bpf_object__find_map_by_name", p, [p, c]),
                ("bpf_map__fd", i, [p]), ("bpf_map_update_elem", i, [i, p, p, ctypes.c_uint64]),
                ("bpf_map_lookup_elem", i, [i, p, p]), ("bpf_map_delete_elem", i, [i, p]),
                ("libbpf_num_possible_cpus", i, []), ("libbpf_set_print", p, [p])]:
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        # libbpf prints its own account of a failure to stderr; fanpkt's one line says
        # what failed, and FANPKT_BPF_LOG=1 keeps libbpf's (the verifier's log) for why
        if not os.environ.get("FANPKT_BPF_LOG"):
            lib.libbpf_set_print(None)
        self.lib = lib


# The tunnel key's local address (struct bpf_tunnel_key.local_ipv4), which fan_rx checks
# the outer destination against and fan_tx sends from, arrived in Linux 5.19. An older
# kernel loads the programs but refuses every key of that size at run time, so it is
# refused here, by version: no probe can see it before traffic does.
MIN_KERNEL = (5, 19)


def kernel_version(release: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


class BpfObject:
    """The loaded object: its programs' and maps' fds, until close()."""

    def __init__(self, path: str = OBJECT):
        release = os.uname().release
        if kernel_version(release) < MIN_KERNEL:
            raise KernelPathError(f"Linux {release} is older than "
                                  f"{'.'.join(map(str, MIN_KERNEL))}, which the eBPF programs "
                                  f"need (the tunnel key's local address)")
        if not os.path.exists(path):
            raise KernelPathError(f"the eBPF object {path} was not built (clang missing "
                                  f"at build time)")
        self._bpf = _Libbpf()
        lib = self._bpf.lib
        self.obj = lib.bpf_object__open_file(path.encode(), None)
        if not self.obj:
            raise KernelPathError(f"cannot open {path}: {os.strerror(ctypes.get_errno())}")
        err = lib.bpf_object__load(self.obj)
        if err:
            lib.bpf_object__close(self.obj)
            self.obj = None
            raise KernelPathError(f"the kernel refused the eBPF programs "
                                  f"({os.strerror(-err)}; FANPKT_BPF_LOG=1 prints libbpf's "
                                  f"log of why)")
        self.progs = {n: lib.bpf_program__fd(lib.bpf_object__find_program_by_name(
            self.obj, n.encode())) for n in ("fan_tx", "fan_rx")}
        self.maps = {n: lib.bpf_map__fd(lib.bpf_object__find_map_by_name(self.obj, n.encode()))
                     for n in ("fan_conf", "fan_by_port", "fan_by_vni", "fan_counters",
                               "local_macs")}
        self.cpus = lib.libbpf_num_possible_cpus()

    def update(self, map_name: str, key: bytes, value: bytes) -> None:
        k, v = ctypes.create_string_buffer(key), ctypes.create_string_buffer(value)
        if self._bpf.lib.bpf_map_update_elem(self.maps[map_name], k, v, 0):
            raise KernelPathError(f"cannot update the eBPF map {map_name}: "
                                  f"{os.strerror(ctypes.get_errno())}")

    def delete(self, map_name: str, key: bytes) -> None:
        k = ctypes.create_string_buffer(key)
        self._bpf.lib.bpf_map_delete_elem(self.maps[map_name], k)

    def counters(self, row: int) -> dict[str, int]:
        """One row of the per-CPU counters (struct counter_row per CPU), summed over the
        CPUs."""
        n = len(KERNEL_COUNTERS)
        buf = (ctypes.c_uint64 * (n * self.cpus))()
        key = ctypes.c_uint32(row)
        if self._bpf.lib.bpf_map_lookup_elem(self.maps["fan_counters"], ctypes.byref(key),
                                             buf):
            raise KernelPathError(f"cannot read the eBPF counters: "
                                  f"{os.strerror(ctypes.get_errno())}")
        return {name: sum(buf[cpu * n + k] for cpu in range(self.cpus))
                for k, name in enumerate(KERNEL_COUNTERS)}

    def close(self) -> None:
        """The programs stay attached where they are: only this process's hold goes."""
        if self.obj:
            self._bpf.lib.bpf_object__close(self.obj)
            self.obj = None


@dataclass
class KernelFan:
    """One fan on the kernel path: its slot (counter row) and devices. To the forwarder it
    is the fan's device, as a Tun is on the userspace engine's (name, index, close), with
    no queue for a transmit loop to read (fds) and no virtio header to probe (gso)."""
    slot: int
    name: str                   # the fan's name, fan-O, whatever its port device
    port: int                   # its UDP port
    vni: int
    port_device: str = ""       # its bridge's port: fanvx-PORT (direct) or fan-O (veth)
    index: int = 0              # port_device's ifindex
    path: Optional["KernelPath"] = None
    fds: tuple = ()
    fd: int = -1
    gso: dict = field(default_factory=dict)
    dev_gso: int = 0

    @property
    def direct(self) -> bool:
        """Whether its bridge's port is the vxlan device itself (no veth, no redirect)."""
        return self.port_device == vxlan_device(self.port)

    def close(self) -> None:
        if self.path is not None:
            self.path.remove(self)
            self.path = None


class KernelPath:
    """Every kernel-path VXLAN fan of this process: one eBPF object, one vxlan device per
    UDP port (its first fan's bridge port), a veth pair for each further fan on a port."""

    def __init__(self, check_spoof: bool = True):
        self.check_spoof = check_spoof
        self.bpf = BpfObject()
        self.fans: dict[int, KernelFan] = {}
        self.ports: dict[int, int] = {}         # UDP port -> fanvx-PORT's ifindex
        self.direct: dict[int, int] = {}        # UDP port -> the slot of its direct fan
        self.local_macs: frozenset = frozenset()

    # -- devices -------------------------------------------------------------------------
    def create(self, slot: int, name: str, port: int, vni: int, mtu: int) -> KernelFan:
        """The fan's bridge port, up: the port's vxlan device (made if this is the port's
        first fan) where no other fan has it, else a veth pair `name`. The caller bridges
        it (plumbing.attach); nothing is steered until configure(). On failure nothing
        stays."""
        fan = KernelFan(slot, name, port, vni, path=self)
        created: list[str] = []
        with IPRoute() as ipr:
            try:
                if port not in self.ports:
                    self.ports[port] = self._vxlan(ipr, port, mtu, created)
                if port not in self.direct:
                    fan.port_device, fan.index = vxlan_device(port), self.ports[port]
                else:
                    fan.port_device = name
                    fan.index = self._veth(ipr, name, mtu, created)
            except NetlinkError as e:
                for dev in reversed(created):
                    _delete(ipr, dev)
                if vxlan_device(port) in created:
                    self.ports.pop(port, None)
                raise KernelPathError(self._why(e, port, name)) from None
        if fan.direct:
            self.direct[port] = slot
        self.fans[slot] = fan
        return fan

    @staticmethod
    def _veth(ipr, name: str, mtu: int, created: list[str]) -> int:
        peer = peer_device(name)
        ipr.link("add", ifname=name, kind="veth", peer=peer)
        created.append(name)
        for dev in (peer, name):
            disable_ipv6(dev)       # no router solicitation into the bridge
            ipr.link("set", index=link_index(ipr, dev), mtu=mtu, state="up")
        return link_index(ipr, name)

    def _vxlan(self, ipr, port: int, mtu: int, created: list[str]) -> int:
        name = vxlan_device(port)
        if link_index(ipr, name) is not None:   # a crashed run's: replaced
            _delete(ipr, name)
        ipr.link("add", ifname=name, kind="vxlan", vxlan_collect_metadata=1,
                 vxlan_learning=0, vxlan_port=port)
        created.append(name)
        idx = link_index(ipr, name)
        disable_ipv6(name)
        ipr.link("set", index=idx, mtu=mtu, state="up")
        _clsact(ipr, idx)
        ipr.tc("add-filter", "bpf", index=idx, handle="0:1", fd=self.bpf.progs["fan_rx"],
               name="fan_rx", parent=TC_INGRESS, classid=1, direct_action=True)
        return idx

    @staticmethod
    def _why(e: NetlinkError, port: int, port_device: str) -> str:
        code = e.args[0] if e.args else 0
        if code == errno.EADDRINUSE:
            return (f"UDP port {port} is taken (a vxlan device or a program listens "
                    f"there)")
        if code == errno.EEXIST:
            return (f"a device named {port_device} or {vxlan_device(port)} exists (a "
                    f"vxlan device with that port?)")
        if code == errno.EOPNOTSUPP:
            return "this kernel has no vxlan or veth support"
        return f"cannot create the devices: {e.args[1] if len(e.args) > 1 else e}"

    # -- steering ------------------------------------------------------------------------
    def configure(self, fan: KernelFan, m, bridge_mac: str) -> None:
        """Write the fan's configuration (m: its FanMap, as the engine takes it) and
        attach fan_tx to fan-O: from here the fan forwards. Called again with a new map
        when the underlay address moves: one map update, atomic for the programs."""
        mac = bytes.fromhex(bridge_mac.replace(":", ""))
        conf = FAN_CONF.pack(m.overlay, _mask(m.overlay_len), m.underlay,
                             _mask(m.underlay_len), m.host, m.local_slice,
                             _mask(m.slice_len), m.shift, fan.vni,
                             self.ports[fan.port], fan.index, int(self.check_spoof), mac)
        slot = struct.pack("=I", fan.slot)
        self.bpf.update("fan_conf", slot, conf)
        self.bpf.update("fan_by_vni", struct.pack("=II", self.ports[fan.port], fan.vni),
                        slot)
        self.bpf.update("fan_by_port", struct.pack("=I", fan.index), slot)
        with IPRoute() as ipr:
            if not _has_filter(ipr, fan.index):
                _clsact(ipr, fan.index)
                ipr.tc("add-filter", "bpf", index=fan.index, handle="0:1",
                       fd=self.bpf.progs["fan_tx"], name="fan_tx", parent=TC_EGRESS,
                       classid=1, direct_action=True)

    def remove(self, fan: KernelFan) -> None:
        """Stop steering for the fan and take its bridge port away: a veth pair is
        deleted; the vxlan device of a direct fan leaves its bridge and loses fan_tx, and
        goes with the port's last fan."""
        self.bpf.delete("fan_by_port", struct.pack("=I", fan.index))
        if fan.port in self.ports:
            self.bpf.delete("fan_by_vni", struct.pack("=II", self.ports[fan.port], fan.vni))
        self.fans.pop(fan.slot, None)
        with IPRoute() as ipr:
            if not fan.direct:
                _delete(ipr, fan.port_device)
            elif self.direct.get(fan.port) == fan.slot:
                del self.direct[fan.port]
                if any(f.port == fan.port for f in self.fans.values()):
                    _release(ipr, fan.index)
            if fan.port in self.ports and not any(f.port == fan.port
                                                  for f in self.fans.values()):
                _delete(ipr, vxlan_device(fan.port))
                del self.ports[fan.port]

    def set_local_macs(self, macs: frozenset) -> None:
        """This host's MACs on its fan bridges (6-byte strings): fan_rx drops a frame from
        the wire that claims one (drop_rx_local_mac). The map is brought in line entry by
        entry: a MAC is in it from its add until its delete."""
        for mac in macs - self.local_macs:
            self.bpf.update("local_macs", mac + bytes(2), b"\1")
        for mac in self.local_macs - macs:
            self.bpf.delete("local_macs", mac + bytes(2))
        self.local_macs = frozenset(macs)

    def uses_port(self, port: int) -> bool:
        return port in self.ports

    def counters(self, fan: KernelFan) -> dict[str, int]:
        return self.bpf.counters(fan.slot)

    def port_counters(self) -> dict[str, int]:
        """What no fan can be charged with: datagrams of a VNI no fan has (the userspace
        engine counts them in the port's receive loop)."""
        return self.bpf.counters(NO_FAN)

    def stop(self) -> None:
        for fan in list(self.fans.values()):
            self.remove(fan)
        self.bpf.close()


def cleanup(port_devices: list[str], ports: list[int]) -> None:
    """Remove what a crashed run left: its veth pairs and vxlan devices (their programs
    go with them)."""
    with IPRoute() as ipr:
        for name in port_devices + [vxlan_device(p) for p in ports]:
            _delete(ipr, name)


def _mask(n: int) -> int:
    return 0 if n == 0 else (0xFFFFFFFF << (32 - n)) & 0xFFFFFFFF


def _clsact(ipr, index: int) -> None:
    try:
        ipr.tc("add", "clsact", index=index)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise


def _release(ipr, index: int) -> None:
    """A vxlan device that was a fan's bridge port, kept for the port's other fans: out
    of the bridge and without fan_tx (what reaches it now is steered already)."""
    try:
        ipr.link("set", index=index, master=0)
        ipr.tc("del-filter", index=index, parent=TC_EGRESS)
    except NetlinkError as e:
        log.warning("could not take the vxlan device (ifindex %d) from its fan: %s", index,
                    e)


def _has_filter(ipr, index: int) -> bool:
    return bool(ipr.get_filters(index=index, parent=TC_EGRESS))


def _delete(ipr, name: str) -> None:
    idx = link_index(ipr, name)
    if idx is not None:
        try:
            ipr.link("del", index=idx)
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                log.warning("could not remove %s: %s", name, e)


def available() -> Optional[str]:
    """None if the kernel path can be set up here, else the reason in one line."""
    try:
        BpfObject().close()
    except KernelPathError as e:
        return str(e)
    return None


def _kernel_fan(fan: Fan) -> KernelFan:
    return cast(KernelFan, fan.device)     # install() made every device of this path


class KernelDataPath(DataPath):
    """The kernel path as the forwarder's data path (fanpkt/datapath.py): its VXLAN fans'
    devices and the eBPF object's maps, through KernelPath. No thread of its own: the
    programs run in the kernel, and outlive the process (cleanup)."""

    name = "kernel"

    def __init__(self, check_spoof: bool = True):
        self.kernel = KernelPath(check_spoof)       # KernelPathError: not here

    def install(self, spec: FanSpec, slot: int, mtu: int) -> KernelFan:
        return self.kernel.create(slot, spec.map.device_name, spec.port, spec.vni_value,
                                  mtu)

    def start(self, fans: list[Fan]) -> None:
        for fan in fans:
            self.kernel.configure(_kernel_fan(fan), fan.spec.map, fan.plumbing.bridge_mac)

    def replace(self, fans: list[Fan]) -> None:
        """Nothing to do: the vxlan device is bound to no interface, and the programs
        send from the fan's own underlay address, which has not changed."""

    def remove(self, fans: list[Fan]) -> None:
        for fan in fans:
            fan.device.close()

    def stop(self, fans: list[Fan]) -> None:
        for fan in fans:
            fan.device.close()
        self.kernel.stop()

    def holds_port(self, port: int, fans: list[Fan]) -> bool:
        return self.kernel.uses_port(port)

    def set_local_macs(self, macs: frozenset) -> None:
        self.kernel.set_local_macs(macs)

    def counter_blocks(self, fans: list[Fan]) -> dict[str, int]:
        """No loop: each fan's first two blocks take the eBPF counters (read_counters),
        transmit in the first, receive in the second."""
        blocks: dict[str, int] = {}
        for f in fans:
            blocks.update({f"tx:{f.device.name}": tx_block(f.slot, 0),
                           f"rx-kernel:{f.device.name}": tx_block(f.slot, 1)})
        return blocks

    def read_counters(self, fans: list[Fan], counters: Counters) -> None:
        """Copy the per-CPU eBPF counters into each fan's two counter blocks, where `fanpkt
        stats`, --watch and /metrics read every fan's; the forwarder does at every TICK. The
        datagrams of no fan (a VNI none has) count with the first fan by slot."""
        if not fans:
            return
        try:
            orphans = self.kernel.port_counters()
            for i, f in enumerate(sorted(fans, key=lambda f: f.slot)):
                blocks = {"tx": counters.block(tx_block(f.slot, 0)),
                          "rx": counters.block(tx_block(f.slot, 1))}
                for name, value in self.kernel.counters(_kernel_fan(f)).items():
                    blocks[kind(name).direction][COUNTER_NAMES.index(name)] = \
                        value + (orphans[name] if i == 0 else 0)
        except KernelPathError as e:    # reading a map must not stop forwarding
            log.warning("%s", e)

    @staticmethod
    def cleanup(leftovers: list[FanState]) -> None:
        """The crashed run's kernel-path fans forwarded on while no forwarder ran: their
        devices go, and the programs with them."""
        fans = [f for f in leftovers if f.datapath == KernelDataPath.name]
        if fans:
            cleanup([f.device for f in fans], sorted({f.port for f in fans}))
