"""One NETLINK_ROUTE socket driven from Trio: batched requests and dumps.

Requests are written many per ``send`` (the kernel handles every message of a
datagram in turn) with at most ``window`` awaiting their ack; acks are matched
by sequence number. The socket is used by one operation at a time (a lock),
which keeps sequence matching trivial and costs nothing: the kernel serialises
address changes anyway.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable

import trio

from duravip.plumbing import rtnl
from duravip.plumbing.netns import open_socket

#: Large receive buffer so a full window of acks (or a dump) never overflows.
RCVBUF = 8 * 1024 * 1024
#: Receive buffer per datagram: dumps come in datagrams of at most 32 KiB.
DGRAM = 64 * 1024
#: Messages written per send() call.
_PER_SEND = 64


def open_route_socket(netns: str | None, groups: int = 0) -> socket.socket:
    """A bound, non-blocking NETLINK_ROUTE socket (``groups``: multicast to join)."""
    sock = open_socket(netns, socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE = 0
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)  # SO_RCVBUFFORCE (needs root)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.setsockopt(rtnl.SOL_NETLINK, rtnl.NETLINK_CAP_ACK, 1)
        sock.bind((0, groups))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class NetlinkError(OSError):
    """A dump failed with a netlink error."""


class NetlinkSocket:
    """Request/ack and dump over one NETLINK_ROUTE socket."""

    def __init__(self, sock: socket.socket, *, window: int = 256) -> None:
        self._sock = sock
        self._buf = bytearray(DGRAM)
        self._lock = trio.Lock()
        self._seq = int.from_bytes(os.urandom(2), "big") << 8
        self.window = window

    def _next_seq(self, n: int = 1) -> int:
        base = self._seq
        self._seq = (self._seq + n) & 0x7FFFFFFF
        if self._seq < base:  # wrapped: restart the range so it stays contiguous
            base, self._seq = 1, 1 + n
        return base

    async def batch(self, n: int, encode: Callable[[int, int], bytes]) -> list[int]:
        """Send ``n`` requests (``encode(i, seq)``), return the errno of each (0 = ok)."""
        results = [-1] * n
        if n == 0:
            return results
        async with self._lock:
            base = self._next_seq(n)
            sent = 0
            pending = 0
            while sent < n or pending:
                while sent < n and pending < self.window:
                    k = min(_PER_SEND, n - sent, self.window - pending)
                    data = b"".join(encode(i, base + i) for i in range(sent, sent + k))
                    await self._send(data)
                    sent += k
                    pending += k
                    # The kernel did the work inside send(); let other tasks
                    # (gossip!) run between chunks of a 10,240-address batch.
                    await trio.lowlevel.checkpoint()
                try:
                    bufs = await self._recv_all()
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    # Acks were dropped: mark what is unaccounted for as failed.
                    for i in range(sent):
                        if results[i] == -1:
                            results[i] = errno.ENOBUFS
                    pending = 0
                    continue
                for buf in bufs:
                    for h in rtnl.iter_messages(buf):
                        if h.type != rtnl.NLMSG_ERROR:
                            continue
                        i = h.seq - base
                        if 0 <= i < n and results[i] == -1:
                            results[i] = rtnl.error_code(buf, h)
                            pending -= 1
        return results

    async def dump(self, msg_type: int) -> list[bytes]:
        """Run a dump; return the raw datagrams (parse with :mod:`rtnl`)."""
        async with self._lock:
            seq = self._next_seq()
            await self._send(rtnl.encode_dump(msg_type, seq))
            chunks: list[bytes] = []
            while True:
                buf = await self._recv()
                done = False
                for h in rtnl.iter_messages(buf):
                    if h.seq != seq:
                        continue
                    if h.type == rtnl.NLMSG_DONE:
                        done = True
                    elif h.type == rtnl.NLMSG_ERROR:
                        code = rtnl.error_code(buf, h)
                        if code:
                            raise NetlinkError(code, os.strerror(code))
                chunks.append(buf)
                if done:
                    return chunks

    async def _send(self, data: bytes) -> None:
        while True:
            try:
                self._sock.sendto(data, (0, 0))
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._sock)
            else:
                return

    async def _recv(self) -> bytes:
        """One datagram; reads straight from the socket while data is queued
        (a Trio socket call per ack would cost more than the kernel's work)."""
        while True:
            try:
                n = self._sock.recv_into(self._buf)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._sock)
            else:
                return bytes(self._buf[:n])

    async def _recv_all(self) -> list[bytes]:
        """Every datagram queued now (at least one): the kernel queues one ack
        per request while still inside send(), so they are all there at once."""
        out = [await self._recv()]
        while True:
            try:
                n = self._sock.recv_into(self._buf)
            except BlockingIOError:
                return out
            out.append(bytes(self._buf[:n]))

    def close(self) -> None:
        self._sock.close()
