"""Trio driver of the control socket: a Unix stream socket speaking line-JSON.

The rules about the path matter more than the serving: never clobber a file
we do not own, never steal the socket of a daemon that is still alive, and
never leave the socket reachable with looser permissions than asked for.
"""

from __future__ import annotations

import errno
import logging
import os
import socket as _stdsocket
import stat
from pathlib import Path
from typing import NoReturn

import trio

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


class ControlSocketError(Exception):
    """The control socket cannot be set up at the configured path."""


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


async def _bind(path: Path, mode: int) -> tuple[trio.socket.SocketType, int]:
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


async def _serve_client(stream: trio.SocketStream, registry: CommandRegistry) -> None:
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
                await _send(stream, Response(ok=False, error=f"bad request: {e}"))
                return
            for line in lines:
                if not line.strip():
                    continue
                try:
                    request = Request.from_line(line)
                except ProtocolError as e:
                    response = Response(ok=False, error=f"bad request: {e}")
                else:
                    response = await registry.dispatch(request)
                await _send(stream, response)


async def serve(
    *,
    path: Path,
    mode: int = 0o600,
    registry: CommandRegistry,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``registry`` on the Unix socket ``path`` until cancelled.

    Raises :class:`ControlSocketError` (before ``started``) when ``path`` is a
    foreign file or a live daemon answers on it. The socket is unlinked on
    exit unless another process has replaced it meanwhile.
    """
    path = Path(path)
    await prepare_path(path)
    sock, inode = await _bind(path, mode)
    limiter = trio.CapacityLimiter(MAX_CLIENTS)

    async def handler(stream: trio.SocketStream) -> None:
        async with limiter:
            try:
                await _serve_client(stream, registry)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.debug("control client went away mid-response")

    try:
        listener = trio.SocketListener(sock)
        log.info("control socket listening on %s (mode %04o)", path, mode)
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
