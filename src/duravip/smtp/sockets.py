"""Listening sockets of the listener manager: creation, and serving a closing backlog.

Split from :mod:`.listeners` (which decides *when* a listener runs) because
this is the part that talks to the kernel: which family, which options, and
what happens to connections the kernel completed but nobody accepted.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable

import trio

log = logging.getLogger("duravip.smtp.listeners")

BACKLOG = 1024
Addr = tuple[str, int]


#: Linux option numbers (Python's socket module lacks some of them).
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
IPV6_FREEBIND = 78


async def open_listening_socket(addr: Addr, *, freebind: bool = False) -> trio.socket.SocketType:
    """A TCP socket bound to ``addr`` and listening (``OSError`` if it cannot be).

    ``freebind``: bind even though the address is not (yet) on the host, so a
    takeover binds its listeners first and only the address add and the
    gratuitous ARP remain between a client's SYN and a listening socket.
    """
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if freebind:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        await sock.bind(addr)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRNOTAVAIL:
            log.warning("%s is not on this host (not plumbed?)", addr[0])
        raise
    return sock


class CapacityLog:
    """At most one log line per ``interval`` about accept capacity errors, over all listeners
    (10,240 DuraVIP listeners out of fds at once must not flood the log)."""

    def __init__(self, interval: float, pause: float) -> None:
        self.interval, self.pause = interval, pause
        self._next_at = float("-inf")
        self._skipped = 0

    def error(self, addr: Addr, exc: OSError) -> None:
        now = trio.current_time()
        if now < self._next_at:
            self._skipped += 1
            return
        self._next_at = now + self.interval
        skipped, self._skipped = self._skipped, 0
        log.error(
            "accept on %s:%d returned %s (%s); pausing %.0f ms and retrying "
            "(%d such errors not logged since the last line; at most one line per %.0f s)",
            *addr,
            errno.errorcode.get(exc.errno or 0, str(exc.errno)),
            os.strerror(exc.errno or 0),
            self.pause * 1000,
            skipped,
            self.interval,
        )


def drain_backlog(
    listener: trio.SocketListener, addr: Addr, admit: Callable[[trio.SocketStream], None]
) -> None:
    """Hand every connection the kernel completed but we never accepted to ``admit``.

    Closing a listening socket resets every connection still in its accept
    queue; those clients connected while we were serving, so they get a
    session (banner, then ``421`` once idle) instead of a reset. Best effort:
    any error (EMFILE included) ends the drain, never the manager, and no fd
    is allocated to do it (the listening fd is borrowed, not dup'ed).
    """
    try:
        raw = socket.socket(fileno=listener.socket.fileno())
    except OSError as exc:
        log.debug("no backlog drain on %s:%d: %s", *addr, exc)
        return
    try:
        while True:
            try:
                conn, _ = raw.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("backlog drain on %s:%d stopped: %s", *addr, exc)
                return
            conn.setblocking(False)
            admit(trio.SocketStream(trio.socket.from_stdlib_socket(conn)))
    finally:
        raw.detach()  # the fd belongs to the trio listener, which closes it
