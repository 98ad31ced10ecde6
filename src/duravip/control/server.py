"""Trio driver of the control socket: a Unix stream socket speaking line-JSON.

The rules about the path matter more than the serving: never clobber a file
we do not own, never steal the socket of a daemon that is still alive, and
never leave the socket reachable with looser permissions than asked for.

The file mode is the first gate; ``SO_PEERCRED`` is the second, so a socket
made reachable by mistake (a wide mode, a bind mount, a leaked directory
permission) still answers only root, the daemon's own user and members of
the configured group. Every request line is untrusted input: whatever it
holds, it is answered with an error and the server keeps serving.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import socket as _stdsocket
import stat
import struct
from pathlib import Path
from typing import NoReturn

import trio
from attrs import frozen

from duravip.control.protocol import (
    MAX_REQUEST_LINE,
    CommandRegistry,
    LineBuffer,
    LineTooLong,
    ProtocolError,
    Request,
    Response,
)

log = logging.getLogger(__name__)

#: Clients served at once; more wait for a slot (the socket is root-only anyway).
MAX_CLIENTS = 64
#: Longest a ``sun_path`` may be on Linux, terminator included.
_SUN_PATH_MAX = 108
#: Linux ``SO_PEERGROUPS`` (4.13+): the peer's supplementary groups at connect time.
_SO_PEERGROUPS = getattr(_stdsocket, "SO_PEERGROUPS", 59)
#: ``struct ucred``: pid, uid, gid.
_UCRED = struct.Struct("=iII")
#: Seconds a refused peer's answer may take to send before we just close.
_REFUSE_SEND_TIMEOUT = 1.0
#: At most one log line about refused peers per this many seconds.
_REFUSE_LOG_INTERVAL = 10.0


class ControlSocketError(Exception):
    """The control socket cannot be set up at the configured path."""


@frozen
class PeerCred:
    """Who is on the other end, as the kernel recorded it at ``connect()``."""

    pid: int
    uid: int
    gid: int
    #: Supplementary groups; empty where the kernel cannot tell (before 4.13).
    groups: tuple[int, ...] = ()


def peer_allowed(cred: PeerCred, *, own_uid: int, group_gid: int | None) -> bool:
    """Root, the daemon's own uid, or a member (primary or supplementary) of the group."""
    if cred.uid in (0, own_uid):
        return True
    return group_gid is not None and (cred.gid == group_gid or group_gid in cred.groups)


def peer_cred(sock: trio.socket.SocketType) -> PeerCred:
    """Read ``SO_PEERCRED`` and ``SO_PEERGROUPS``; raises :class:`OSError` if unavailable."""
    raw = sock.getsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCred(pid=pid, uid=uid, gid=gid, groups=_peer_groups(sock))


def _peer_groups(sock: trio.socket.SocketType) -> tuple[int, ...]:
    for n in (64, 65536):  # NGROUPS_MAX is 65536; almost everyone has fewer than 64
        try:
            raw = sock.getsockopt(_stdsocket.SOL_SOCKET, _SO_PEERGROUPS, 4 * n)
        except OSError as e:
            if e.errno == errno.ERANGE:
                continue
            if e.errno == errno.ENOPROTOOPT:
                return ()  # old kernel: only the primary group counts
            raise
        return struct.unpack(f"={len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    return ()


def resolve_group(group: str) -> int:
    """The gid of a group name (or of a number given as text)."""
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise ControlSocketError(f"control socket group {group!r} does not exist") from None


async def _probe_live(path: Path) -> bool:
    """True if something accepts connections on the socket at ``path``."""
    sock = trio.socket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM)
    try:
        with trio.move_on_after(2):
            await sock.connect(os.fspath(path))
            return True
        return True  # connect hung: the backlog is full, so someone is there
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as e:
        raise ControlSocketError(f"{path} is a socket we cannot probe: {e}") from e
    finally:
        sock.close()


async def prepare_path(path: Path) -> None:
    """Refuse a foreign file or a live daemon; remove a stale socket; create the parent."""
    if len(os.fsencode(path)) + 1 > _SUN_PATH_MAX - 16:
        raise ControlSocketError(f"control socket path too long: {path}")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlSocketError(
                f"{path} exists and is not a socket; refusing to replace it"
            )
        if await _probe_live(path):
            raise ControlSocketError(
                f"a daemon is already answering on {path}; refusing to start a second one"
            )
        log.info("removing stale control socket %s", path)
        path.unlink(missing_ok=True)
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)


async def _bind(
    path: Path, mode: int, gid: int | None = None
) -> tuple[trio.socket.SocketType, int]:
    """Bind under a temporary name, chmod, listen, then rename into place.

    The rename makes the socket appear at ``path`` already with its final
    mode, so no client can connect during a window of umask permissions.
    Returns the socket and the inode that identifies it.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    sock = trio.socket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM)
    try:
        await sock.bind(os.fspath(tmp))
        if gid is not None:
            os.chown(tmp, -1, gid)  # before chmod: chown may clear mode bits
        os.chmod(tmp, mode)
        sock.listen(MAX_CLIENTS)
        os.rename(tmp, path)
    except BaseException:
        sock.close()
        tmp.unlink(missing_ok=True)
        raise
    return sock, os.lstat(path).st_ino


async def _send(stream: trio.SocketStream, response: Response) -> None:
    await stream.send_all(response.to_line())


def _count(counters: dict[str, int], key: str) -> None:
    counters[key] = counters.get(key, 0) + 1


async def _serve_client(
    stream: trio.SocketStream, registry: CommandRegistry, counters: dict[str, int]
) -> None:
    buf = LineBuffer(MAX_REQUEST_LINE)
    async with stream:
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not data:
                return
            try:
                lines = buf.feed(data)
            except LineTooLong as e:
                _count(counters, "line_too_long")
                await _send(stream, Response(ok=False, error=f"bad request: {e}"))
                return
            for line in lines:
                if not line.strip():
                    continue
                try:
                    request = Request.from_line(line)
                except ProtocolError as e:
                    _count(counters, "bad_request")
                    response = Response(ok=False, error=f"bad request: {e}")
                else:
                    response = await registry.dispatch(request)
                await _send(stream, response)


class _Gate:
    """The ``SO_PEERCRED`` check of each new connection, with throttled logging."""

    def __init__(self, group: str | None, counters: dict[str, int]) -> None:
        self.own_uid = os.geteuid()
        self.group = group
        self.gid = resolve_group(group) if group is not None else None
        self.counters = counters
        self._last_log = -_REFUSE_LOG_INTERVAL
        self._unlogged = 0

    async def admit(self, stream: trio.SocketStream) -> bool:
        """True to serve ``stream``; otherwise answer the refusal, count it and say no."""
        try:
            cred: PeerCred | None = peer_cred(stream.socket)
        except OSError as e:  # fail closed
            log.warning("control socket: cannot read peer credentials: %s", e)
            cred = None
        if cred is not None and peer_allowed(cred, own_uid=self.own_uid, group_gid=self.gid):
            return True
        _count(self.counters, "refused_peer")
        who = f"uid {cred.uid}" if cred is not None else "an unidentified peer"
        allowed = f"root, uid {self.own_uid}" + (
            f" or group {self.group}" if self.group is not None else "")
        self._log(cred)
        with trio.move_on_after(_REFUSE_SEND_TIMEOUT):
            await _send(stream, Response(
                ok=False, error=f"permission denied: {who} is not allowed on this control "
                                f"socket ({allowed} only)"))
        return False

    def _log(self, cred: PeerCred | None) -> None:
        now = trio.current_time()
        if now - self._last_log < _REFUSE_LOG_INTERVAL:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more since the last report)" if self._unlogged else ""
        log.warning("control socket: refused a connection from %s%s",
                    f"pid {cred.pid} uid {cred.uid} gid {cred.gid}" if cred else "unknown peer",
                    more)
        self._last_log, self._unlogged = now, 0


async def serve(
    *,
    path: Path,
    mode: int = 0o600,
    registry: CommandRegistry,
    group: str | None = None,
    counters: dict[str, int] | None = None,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``registry`` on the Unix socket ``path`` until cancelled.

    Raises :class:`ControlSocketError` (before ``started``) when ``path`` is a
    foreign file, a live daemon answers on it, or ``group`` does not exist.
    With ``group`` the socket file belongs to that group and its members may
    connect (given a mode that lets them). ``counters`` (for metrics) counts
    ``connections``, ``refused_peer``, ``bad_request``, ``line_too_long`` and
    ``internal_error``. The socket is unlinked on exit unless another process
    has replaced it meanwhile.
    """
    path = Path(path)
    counters = {} if counters is None else counters
    gate = _Gate(group, counters)
    await prepare_path(path)
    try:
        sock, inode = await _bind(path, mode, gate.gid)
    except PermissionError as e:
        raise ControlSocketError(f"cannot give {path} group {group}: {e}") from e
    limiter = trio.CapacityLimiter(MAX_CLIENTS)

    async def handler(stream: trio.SocketStream) -> None:
        _count(counters, "connections")
        try:
            # before taking a slot: a refused peer never holds one
            if not await gate.admit(stream):
                return
            async with limiter:
                await _serve_client(stream, registry, counters)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("control client went away mid-response")
        except Exception:  # a bug here must cost one connection, never the daemon
            _count(counters, "internal_error")
            log.exception("control connection failed")

    try:
        listener = trio.SocketListener(sock)
        log.info("control socket listening on %s (mode %04o%s)", path, mode,
                 f", group {group}" if group is not None else "")
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handler, [listener])
            task_status.started(path)
            await trio.sleep_forever()
    finally:
        sock.close()
        _unlink_if_ours(path, inode)
    raise AssertionError("unreachable")


def _unlink_if_ours(path: Path, inode: int) -> None:
    try:
        if os.lstat(path).st_ino == inode:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno != errno.ENOENT:
            log.warning("could not remove control socket %s: %s", path, e)
