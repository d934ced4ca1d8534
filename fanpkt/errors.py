"""Operator-facing errors: each is one clear sentence and a distinct exit status.

The CLI prints `fanpkt: <message>` and exits with the class's status; nothing below the
CLI prints or exits by itself.
"""


class FanError(Exception):
    """Base class; the message is the whole story, no traceback needed."""
    exit_status = 1


class Unroutable(FanError):
    """An overlay address maps to the underlay network or broadcast address."""
    exit_status = 1


class ConfigError(FanError):
    """A map, a config file line or a command-line argument is wrong."""
    exit_status = 2


class PrivilegeError(FanError):
    """Not root / no CAP_NET_ADMIN."""
    exit_status = 3


class DeviceError(FanError):
    """/dev/net/tun missing, a device name already taken, or a device that will not come up."""
    exit_status = 4


class AddressError(FanError):
    """The underlay address is not configured on this host."""
    exit_status = 5


class NotRunning(FanError):
    """`fanpkt show`/`stats` found no running forwarder in this network namespace."""
    exit_status = 6


class AlreadyRunning(FanError):
    """Another fanpkt-forward already runs in this network namespace."""
    exit_status = 7


class BuildError(FanError):
    """The compiled core is missing."""
    exit_status = 8


class LoopError(FanError):
    """A forwarding loop died: the process stops, so that its supervisor restarts it."""
    exit_status = 9


class AddressInUse(FanError):
    """An address fanpkt-forward is told to listen on (--metrics) is taken."""
    exit_status = 10


class NotABridge(FanError):
    """`bridge NAME` names an existing interface that is no bridge (eth0, a typo): nothing
    is changed. Its own status, since no restart fixes it and the name is the operator's."""
    exit_status = 11
