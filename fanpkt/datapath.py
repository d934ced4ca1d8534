"""A fan's data path: what carries its packets between its device and the underlay.

Two implement DataPath: the userspace engine (fanpkt/userpath.py: a TUN or TAP per fan,
the engine's table, its loops and sockets, behind fanpkt/engine.py) and the kernel path
(fanpkt/kernelpath.py: a VXLAN fan's bridge port, the vxlan device of its UDP port or a
veth pair to it, steered by eBPF). The forwarder picks one per fan (Forwarder._install)
and from then on speaks to it only through this interface. A fan's life on its path:

    device = path.install(spec, slot, mtu)   # its device, for plumbing.attach
    ... plumbing.attach(spec, device.index, ...) -> Fan(..., device, plumbing, path)
    path.start([fan])                        # it forwards from here
    path.replace([fan])                      # its underlay address moved to another interface
    path.read_counters([fan, ...], counters) # into its counter blocks (counter_blocks)
    path.remove([fan])                       # its device gone; the plumbing is the caller's

and, for the forwarder's whole run: set_local_macs, holds_port, check/ticks/loops (the
health of the threads a path runs, if any), stop, and cleanup of a crashed run's leftovers.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .fanmap import ip
from .runstate import FanState

if TYPE_CHECKING:
    from .config import FanSpec
    from .plumbing import Plumbing
    from .runstate import Counters
    from .underlay import Interface


class Device(Protocol):
    """A fan's device as its path made it: the fan bridge's port (VXLAN) or the TUN that
    holds the overlay's routes (IPIP)."""

    @property
    def name(self) -> str: ...

    @property
    def index(self) -> int: ...

    @property
    def gso(self) -> dict: ...      # each GSO type, and whether the device took it

    def close(self) -> None: ...


@dataclass
class Fan:
    spec: FanSpec
    slot: int                   # its counter blocks' (runstate.tx_block) and the kernel path's row
    underlay: Interface
    device: Device
    plumbing: Plumbing
    path: DataPath

    @property
    def datapath(self) -> str:
        return self.path.name

    @property
    def overlay_mtu(self) -> int:
        return self.underlay.mtu - self.spec.overhead

    def state(self) -> FanState:
        m = self.spec.map
        return FanState(device=self.device.name, bridge=self.spec.bridge_name,
                        overlay=str(m.overlay_net), underlay=f"{ip(m.host)}/{m.underlay_len}",
                        slice=f"{ip(m.local_slice)}/{m.slice_len}", flags=self.spec.flags,
                        mtu=self.overlay_mtu, plumbing=self.plumbing.to_json(),
                        type=self.spec.type, port=self.spec.port if self.spec.vxlan else 0,
                        offloads=self.offloads(), datapath=self.datapath)

    def offloads(self) -> dict[str, bool]:
        """The offloads its device's writes (and, for VXLAN, its sends) may use: each GSO
        type, and whether the kernel took it when probed (tun.Tun.gso)."""
        return {f"gso_{name}": taken for name, taken in self.device.gso.items()}


class DataPath(ABC):
    """One way of carrying fans. Methods taking a list of fans get only fans of this
    path; a fan is started at most once and removed at most once."""

    name: str                   # "user" or "kernel": FanState.datapath, `fanpkt stats`

    @abstractmethod
    def install(self, spec: FanSpec, slot: int, mtu: int) -> Device:
        """The fan's device, up, with the overlay MTU `mtu`, for plumbing.attach; nothing
        forwards through it until start(). On failure nothing stays; closing the device
        undoes it where plumbing.attach fails."""

    @abstractmethod
    def start(self, fans: list[Fan]) -> None:
        """The fans, attached (their plumbing done), forward from here."""

    @abstractmethod
    def replace(self, fans: list[Fan]) -> None:
        """The fans' underlay addresses moved to other interfaces (Fan.underlay is the new
        one): carry them on from there."""

    @abstractmethod
    def remove(self, fans: list[Fan]) -> None:
        """Stop carrying the fans and remove their devices (started or only installed).
        The other fans forward on."""

    @abstractmethod
    def counter_blocks(self, fans: list[Fan]) -> dict[str, int]:
        """Name -> counter block (runstate) of every block this path counts in, for its
        fans `fans`: state.json's counter_blocks, which `fanpkt stats` reads."""

    def read_counters(self, fans: list[Fan], counters: Counters) -> None:
        """Bring the fans' counter blocks up to date, where the path counts elsewhere
        (the engine's loops count in them directly)."""

    def set_local_macs(self, macs: frozenset) -> None:
        """This host's MACs on its VXLAN fan bridges (6-byte strings): a frame from the
        wire claiming one is dropped (drop_rx_local_mac)."""

    @abstractmethod
    def holds_port(self, port: int, fans: list[Fan]) -> bool:
        """Whether this path, carrying `fans`, holds VXLAN UDP port `port`: a port is one
        path's, and the other cannot take it."""

    def check(self) -> None:
        """Raise LoopError if a thread this path runs has died."""

    def ticks(self) -> dict[str, int]:
        """Each of its threads' tick, which advances while the thread is alive and not stuck
        (the watchdog's)."""
        return {}

    def loops(self) -> dict[str, bool]:
        """Each of its threads, and whether it runs (/metrics' fanpkt_loop_up)."""
        return {}

    @abstractmethod
    def stop(self, fans: list[Fan]) -> None:
        """Remove the fans (every fan this path still carries) and whatever else the path
        holds. Safe after a partial start and twice."""

    @staticmethod
    def cleanup(leftovers: list[FanState]) -> None:
        """Remove what a crashed run left on this path, given the run's fans (those of
        every path: each takes its own, by FanState.datapath)."""
