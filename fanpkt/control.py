"""The control socket: `fanpkt up` and `fanpkt down` change the fans of the running
fanpkt-forward of this network namespace, as `fanctl up`/`down` change a host's
(docs/internals.md §7). This module owns the request and reply format, the server the
forwarder's main thread runs, what each request does, and the client.

The socket is `control` in the run directory (fanpkt/runstate.py): AF_UNIX, SOCK_STREAM,
mode 0600, and every peer's SO_PEERCRED uid must be 0. One request per connection, one
JSON object on one line of at most MAX_REQUEST bytes; one JSON reply line, then the server
closes. Requests:

    {"op": "up",   "fans": [["241.0.0.0/8", "172.16.3.4/16", "bridge", "fanbr0"], ...]}
    {"op": "down", "fans": [["241.0.0.0/8", "172.16.3.4/16"], ["10.0.0.0/8"], ...]}
    {"op": "up" | "down", "all": true, "config": "/etc/network/fan" | null}
    {"op": "down", "every": true}

An `up` fan is a config-file line's tokens (overlay, underlay, flags), parsed by config.py
in the forwarder; a `down` fan is an overlay and optionally the underlay. `all` is every
non-'off' line of the file (null: the forwarder's `-c` file, else /etc/network/fan),
`every` every running fan. Replies: {"ok": true, "fans": [device, ...]} (the fans running
afterwards) or {"ok": false, "status": N, "error": "..."} with N an exit status of
fanpkt/errors.py.

The server never blocks: the main thread select()s on the listening socket and every open
connection, reads what is there, and drops a client that sends more than MAX_REQUEST bytes
or takes longer than REQUEST_TIMEOUT. The forwarding loops never wait for any of it.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import struct
import time
from typing import Callable, Optional

from .config import MAX_FANS, KernelResolver, make_spec, parse_file, resolve_underlay
from .errors import ConfigError, DeviceError, FanError, NotRunning, PrivilegeError
from .fanmap import expand_overlay, mask, parse_prefix

log = logging.getLogger("fanpkt")

MAX_REQUEST = 64 * 1024     # bytes: a request for MAX_FANS fans needs a few hundred
MAX_TOKENS = 32             # per fan: overlay, underlay and flags
MAX_TOKEN = 256             # characters per token
REQUEST_TIMEOUT = 2.0       # s from accept to a complete request
MAX_CLIENTS = 4             # connections open at once; more are answered "busy"
BACKLOG = 16                # connections the kernel queues until the main thread accepts
REPLY_TIMEOUT = 60.0        # s the client waits (a dhcp fan takes up to 5 s to come up)
DEFAULT_CONFIG = "/etc/network/fan"
HOW_TO_START = ("start one with `fanpkt-forward -c /etc/network/fan` (or `systemctl start "
                "fanpkt-forward`), or `fanpkt-forward -o OVERLAY -u UNDERLAY`")


class BadRequest(ConfigError):
    """A request the server cannot read (exit status 2, as any bad argument)."""


def status_error(status: int, message: str) -> FanError:
    """A FanError with a given exit status: what the server reports, the client raises."""
    e = FanError(message)
    e.exit_status = status
    return e


def error_reply(e: FanError) -> dict:
    return {"ok": False, "status": e.exit_status, "error": str(e)}


# -- what a request does ---------------------------------------------------------------
def check_request(req) -> dict:
    """The request's shape, or BadRequest: nothing of it is trusted before this."""
    if not isinstance(req, dict):
        raise BadRequest("bad request: not a JSON object")
    op = req.get("op")
    if op not in ("up", "down"):
        raise BadRequest(f"bad request: op must be 'up' or 'down', not {op!r}")
    forms = [k for k in ("fans", "all", "every") if k in req]
    if len(forms) != 1:
        raise BadRequest("bad request: give exactly one of fans, all, every")
    unknown = set(req) - {"op", "fans", "all", "every", "config"}
    if unknown:
        raise BadRequest(f"bad request: unknown field(s) {', '.join(sorted(unknown))}")
    if "fans" in req:
        fans = req["fans"]
        if not isinstance(fans, list) or not 1 <= len(fans) <= MAX_FANS:
            raise BadRequest(f"bad request: fans must be a list of 1 to {MAX_FANS} fans")
        least, most = (2, MAX_TOKENS) if op == "up" else (1, 2)
        for fan in fans:
            if not (isinstance(fan, list) and least <= len(fan) <= most and
                    all(isinstance(t, str) and 0 < len(t) <= MAX_TOKEN for t in fan)):
                raise BadRequest(f"bad request: each fan of '{op}' must be a list of {least} "
                                 f"to {most} non-empty strings")
    elif "all" in req:
        config = req.get("config")
        if req["all"] is not True or not (config is None or
                                          (isinstance(config, str) and config)):
            raise BadRequest("bad request: all must be true, config a path or null")
    elif req["every"] is not True or op != "down":
        raise BadRequest("bad request: every must be true, and only with down")
    return req


def apply(fwd, req: dict) -> dict:
    """Carry out a checked request on a Forwarder (fanpkt/forwarder.py): work out the new
    set of fans and hand it to Forwarder.reload, the path SIGHUP takes, so unchanged fans
    keep forwarding. Raises FanError for what the client must hear."""
    resolver = KernelResolver()
    running = list(fwd.specs)
    if "every" in req:
        wanted = []
    elif "all" in req:
        path = req.get("config") or fwd.config_path or DEFAULT_CONFIG
        from_file = [s for s in parse_file(path, resolver) if not s.off]
        if req["op"] == "up":
            wanted = running + _new(running, from_file)
        else:
            overlays = {s.map.overlay_net for s in from_file}
            wanted = [s for s in running if s.map.overlay_net not in overlays]
    elif req["op"] == "up":
        specs = [make_spec(f[0], f[1], f[2:], resolver, origin="fanpkt up")
                 for f in req["fans"]]
        if any(s.off for s in specs):
            raise ConfigError("'off' fans are never brought up")
        wanted = running + _new(running, specs)
    else:
        gone = [_find(running, f, resolver) for f in req["fans"]]
        wanted = [s for s in running if not any(s is g for g in gone)]
    if [s.key() for s in wanted] != [s.key() for s in running]:
        failed = fwd.reload(wanted)         # checks the new table first, as for SIGHUP
        if failed:                          # the others are up; say why this one is not
            spec, e = failed[0]
            raise status_error(e.exit_status if isinstance(e, FanError)
                               else DeviceError.exit_status,
                               f"cannot bring up {spec.map.overlay_net}: {e}")
    return {"ok": True, "fans": [f.device.name for f in fwd.fans.values()]}


def _new(running: list, specs: list) -> list:
    """The specs not running yet; one whose overlay runs with other settings is an error
    (take it down first), so nothing is changed behind the operator's back."""
    keys = {s.key() for s in running}
    by_overlay = {s.map.overlay_net: s for s in running}
    out = []
    for s in specs:
        if s.key() in keys:
            continue
        if s.map.overlay_net in by_overlay:
            raise ConfigError(f"{s.origin}: overlay {s.map.overlay_net} is already up with "
                              f"other settings ({by_overlay[s.map.overlay_net].origin}); "
                              f"take it down first (`fanpkt down -o {s.map.overlay_net}`)")
        out.append(s)
    return out


def _find(running: list, fan: list, resolver):
    """The running fan of overlay fan[0] (and, if given, underlay fan[1])."""
    oa, o = parse_prefix(expand_overlay(fan[0]), "overlay")
    host = None
    if len(fan) > 1:
        host, u = parse_prefix(resolve_underlay(fan[1], resolver), "underlay")
    for s in running:
        m = s.map
        if (m.overlay, m.overlay_len) == (oa & mask(o), o) and \
                (host is None or (m.host, m.underlay_len) == (host, u)):
            return s
    raise ConfigError(f"no running fan has overlay {fan[0]}"
                      + (f" and underlay {fan[1]}" if len(fan) > 1 else "")
                      + " (see `fanpkt show`)")


# -- the server ------------------------------------------------------------------------
class _Client:
    def __init__(self, sock: socket.socket, now: float):
        self.sock = sock
        self.deadline = now + REQUEST_TIMEOUT
        self.buf = b""


class ControlServer:
    """The listening socket and open connections, serviced from the forwarder's main
    thread (Forwarder.serve): fds() to select() on, service() after every select()."""

    def __init__(self, path: str, handle: Callable[[dict], dict]):
        self.path = path
        self.handle = handle
        self.clients: dict[int, _Client] = {}
        try:        # a crashed run's socket: ours to replace, the run directory is locked
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.listener: Optional[socket.socket] = socket.socket(socket.AF_UNIX,
                                                               socket.SOCK_STREAM)
        try:
            self.listener.bind(path)
            os.chmod(path, 0o600)       # SO_PEERCRED is checked as well
            self.listener.listen(BACKLOG)
            self.listener.setblocking(False)
        except OSError as e:            # a --run-dir path too long for AF_UNIX, say
            self.close()
            raise ConfigError(f"cannot create the control socket {path}: "
                              f"{e.strerror or e}") from None

    def fds(self) -> list:
        if self.listener is None:
            return []
        return [self.listener] + [c.sock for c in self.clients.values()]

    def service(self, ready: list) -> None:
        now = time.monotonic()
        if self.listener is not None and self.listener in ready:
            self._accept(now)
        for fd, c in list(self.clients.items()):
            if c.sock in ready:
                self._read(c)
            elif now > c.deadline and fd in self.clients:
                self._finish(c, error_reply(BadRequest(
                    f"bad request: none complete within {REQUEST_TIMEOUT:g} s")))

    def _accept(self, now: float) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:        # EMFILE and the like: the next select retries
                log.warning("control socket: accept failed (%s)", e)
                return
            sock.setblocking(False)
            pid, uid, _ = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            c = _Client(sock, now)
            if uid != 0:
                log.warning("control socket: refused pid %d (uid %d): root only", pid, uid)
                self._finish(c, error_reply(PrivilegeError(
                    f"the control socket is root's only (you are uid {uid})")))
            elif len(self.clients) >= MAX_CLIENTS:
                self._finish(c, error_reply(FanError("busy: too many control connections; "
                                                     "try again")))
            else:
                self.clients[sock.fileno()] = c

    def _read(self, c: _Client) -> None:
        try:
            data = c.sock.recv(MAX_REQUEST + 1 - len(c.buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._finish(c, None)
            return
        c.buf += data
        line, nl, _ = c.buf.partition(b"\n")
        if len(line) > MAX_REQUEST:
            self._finish(c, error_reply(BadRequest(f"bad request: over {MAX_REQUEST} bytes")))
        elif nl or not data:        # a whole line, or the client ended its request
            self._finish(c, self._answer(line))

    def _answer(self, line: bytes) -> dict:
        try:
            try:
                req = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):   # nested too deep
                raise BadRequest("bad request: not one line of JSON") from None
            return self.handle(check_request(req))
        except FanError as e:
            return error_reply(e)
        except Exception as e:      # noqa: BLE001 - a bug must not end the forwarder
            log.exception("control request failed")
            return error_reply(FanError(f"internal error: {type(e).__name__}: {e}"))

    def _finish(self, c: _Client, reply: Optional[dict]) -> None:
        """Send the reply (it fits an empty socket buffer; a client that has gone just
        misses it) and close."""
        self.clients.pop(c.sock.fileno(), None)
        if reply is not None:
            try:
                c.sock.send(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass
        c.sock.close()

    def close(self) -> None:
        for c in list(self.clients.values()):
            self._finish(c, error_reply(NotRunning("fanpkt-forward is stopping")))
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


# -- the client --------------------------------------------------------------------------
def request(path: str, req: dict, timeout: float = REPLY_TIMEOUT) -> dict:
    """Send one request to the forwarder whose control socket is at path and return its
    reply; FanError with the forwarder's exit status if it refused."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunning(f"no fanpkt-forward is running in this network namespace; "
                             f"{HOW_TO_START}") from None
        except PermissionError:
            raise PrivilegeError(f"fanpkt {req.get('op')} must run as root (the control "
                                 f"socket {path} is root's only)") from None
        data = b""
        try:
            try:
                s.sendall(json.dumps(req).encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass        # refused at once (not root, busy): the reply is there to read
            while len(data) <= MAX_REQUEST and not data.endswith(b"\n"):
                chunk = s.recv(MAX_REQUEST)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            raise NotRunning(f"fanpkt-forward did not answer on {path} within "
                             f"{timeout:g} s") from None
        except ConnectionResetError:
            pass
    finally:
        s.close()
    try:
        reply = json.loads(data.decode("utf-8"))
        ok = reply["ok"]
    except (UnicodeDecodeError, ValueError, TypeError, KeyError):
        raise NotRunning(f"fanpkt-forward closed {path} without an answer "
                         f"(it is stopping?)") from None
    if not ok:
        status = reply.get("status")
        raise status_error(status if isinstance(status, int) and 0 < status < 126 else 1,
                           str(reply.get("error")))
    return reply
