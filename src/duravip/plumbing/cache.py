"""The iflist cache: IPv4 and IPv6 addresses per interface, kept from netlink events.

:class:`AddressCache` is the sans-IO state (apply a dump, apply events);
:func:`run_cache` is the Trio driver reading ``RTMGRP_IPV4_IFADDR``, ``RTMGRP_IPV6_IFADDR`` and link
events. After ENOBUFS (events were lost) the socket is drained first, then the
table is re-dumped: re-dumping without draining loses later events silently.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Collection, Iterable

import trio
import trio_util

from duravip.ipaddr import IPAddress
from duravip.plumbing import rtnl
from duravip.plumbing.nlsock import DGRAM, NetlinkSocket

log = logging.getLogger("duravip.plumbing")


class AddressCache:
    """Which addresses are on which interface index (and, for IPv6, with which prefix)."""

    def __init__(self) -> None:
        self._where: dict[IPAddress, set[int]] = {}
        #: IPv6 only: the kernel deletes an IPv6 address only with its prefix length.
        self._plen6: dict[tuple[IPAddress, int], int] = {}
        #: Bumped on every change; drivers wait on it.
        self.version = 0
        #: True once a full dump has been applied (before that, answers are unknown).
        self.synced = False
        self.resyncs = 0

    def replace(self, addrs: Iterable[rtnl.AddrInfo]) -> None:
        """Replace everything with a fresh dump."""
        where: dict[IPAddress, set[int]] = {}
        plen6: dict[tuple[IPAddress, int], int] = {}
        for a in addrs:
            where.setdefault(a.ip, set()).add(a.index)
            if a.ip.version == 6:
                plen6[(a.ip, a.index)] = a.prefixlen
        self._where = where
        self._plen6 = plen6
        self.synced = True
        self.version += 1

    def added(self, a: rtnl.AddrInfo) -> None:
        self._where.setdefault(a.ip, set()).add(a.index)
        if a.ip.version == 6:
            self._plen6[(a.ip, a.index)] = a.prefixlen
        self.version += 1

    def removed(self, a: rtnl.AddrInfo) -> None:
        idx = self._where.get(a.ip)
        if a.ip.version == 6:
            self._plen6.pop((a.ip, a.index), None)
        if idx is not None:
            idx.discard(a.index)
            if not idx:
                del self._where[a.ip]
        self.version += 1

    def link_gone(self, index: int) -> None:
        """A deleted link takes its addresses with it (the kernel may not say so per address)."""
        for ip in [ip for ip, idx in self._where.items() if index in idx]:
            self.removed(rtnl.AddrInfo(ip, index, 0))

    def present(self, managed: Collection[IPAddress]) -> frozenset[IPAddress]:
        if len(managed) < len(self._where):
            return frozenset(ip for ip in managed if ip in self._where)
        return frozenset(ip for ip in self._where if ip in managed)

    def interfaces_of(self, ip: IPAddress) -> frozenset[int]:
        return frozenset(self._where.get(ip, ()))

    def prefixlen(self, ip: IPAddress, index: int, default: int) -> int:
        """The prefix length ``ip`` has on ``index`` (IPv6; ``default`` when unknown)."""
        return self._plen6.get((ip, index), default)

    def __len__(self) -> int:
        return len(self._where)

    def apply(self, buf: bytes) -> list[int]:
        """Apply an event datagram; return indexes of links that were deleted."""
        gone: list[int] = []
        for h in rtnl.iter_messages(buf):
            if h.type == rtnl.RTM_NEWADDR:
                a = rtnl.parse_addr(buf, h)
                if a is not None:
                    self.added(a)
            elif h.type == rtnl.RTM_DELADDR:
                a = rtnl.parse_addr(buf, h)
                if a is not None:
                    self.removed(a)
            elif h.type == rtnl.RTM_DELLINK:
                index = int.from_bytes(buf[h.start + 20 : h.start + 24], "little", signed=True)
                self.link_gone(index)
                gone.append(index)
        return gone


def addrs_from_dump(chunks: list[bytes]) -> list[rtnl.AddrInfo]:
    out: list[rtnl.AddrInfo] = []
    for buf in chunks:
        for h in rtnl.iter_messages(buf):
            if h.type == rtnl.RTM_NEWADDR:
                a = rtnl.parse_addr(buf, h)
                if a is not None:
                    out.append(a)
    return out


def _drain(sock: socket.socket) -> int:
    """Read and drop everything queued (non-blocking); return how many datagrams."""
    n = 0
    while True:
        try:
            sock.recv(DGRAM)
        except BlockingIOError:
            return n
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
        n += 1


async def run_cache(
    cache: AddressCache,
    events: socket.socket,
    requests: NetlinkSocket,
    changed: trio_util.AsyncValue[int],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep ``cache`` current from ``events`` (a socket joined to the address groups)."""
    tsock = trio.socket.from_stdlib_socket(events)
    # Events that arrive during the initial dump are replayed on top of it: a
    # NEWADDR twice or a DELADDR of something absent are both harmless.
    cache.replace(addrs_from_dump(await requests.dump(rtnl.RTM_GETADDR)))
    task_status.started()
    while True:
        try:
            buf = await tsock.recv(DGRAM)
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
            dropped = _drain(events)
            log.warning("iflist cache: event overflow (ENOBUFS); drained %d, re-dumping", dropped)
            cache.resyncs += 1
            cache.replace(addrs_from_dump(await requests.dump(rtnl.RTM_GETADDR)))
        else:
            cache.apply(buf)
        changed.value += 1
