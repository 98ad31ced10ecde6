"""The real plumber: addresses through one Trio-driven netlink socket.

Interface indexes come from a link dump, refreshed whenever a placement names
an interface not in the table (or the kernel answers ENODEV). With
``use_iflist_cache`` a second socket follows address events and ``present()``
is answered from memory; otherwise each ``present()`` is one address dump.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager

import trio
import trio_util

from duravip.ipaddr import IPAddress
from duravip.plumbing import rtnl
from duravip.plumbing.base import Carrier, Placement, Results
from duravip.plumbing.cache import AddressCache, addrs_from_dump, run_cache
from duravip.plumbing.garp import DEFAULT_RATE, GarpSender, plan_frames
from duravip.plumbing.ndisc import NdiscSender, plan_adverts
from duravip.plumbing.nlsock import DGRAM, NetlinkSocket, open_route_socket

log = logging.getLogger("duravip.plumbing")


class NetlinkPlumber:
    """:class:`~duravip.plumbing.base.Plumber` on the kernel. Build it with :func:`open_netlink_plumber`."""

    def __init__(
        self,
        nl: NetlinkSocket,
        garp: GarpSender,
        cache: AddressCache | None,
        netns: str | None = None,
        *,
        na_router: bool = False,
    ) -> None:
        self._nl = nl
        self._netns = netns
        self._garp = garp
        #: IPv6 DuraVIPs are announced with unsolicited neighbour advertisements.
        self._ndisc = NdiscSender(netns, rate=garp.rate)
        self.na_router = na_router
        self.cache = cache
        self._links: dict[str, rtnl.LinkInfo] = {}
        #: Bumped whenever the iflist cache changes (stays 0 without the cache).
        self.changed = trio_util.AsyncValue(0)

    @property
    def netns(self) -> str | None:
        """The namespace this plumber works in (None: where the process stands)."""
        return self._netns

    async def refresh_links(self) -> dict[str, rtnl.LinkInfo]:
        links = rtnl.parse_links(await self._nl.dump(rtnl.RTM_GETLINK))
        self._links = {link.name: link for link in links}
        return self._links

    async def _resolve(self, placements: Sequence[Placement]) -> dict[str, rtnl.LinkInfo]:
        if any(p.interface not in self._links for p in placements):
            await self.refresh_links()
        return self._links

    async def plumb(self, placements: Sequence[Placement]) -> Results:
        links = await self.refresh_links()  # a fresh up/down state: links are few
        out: dict[IPAddress, str | None] = {}
        todo: list[tuple[Placement, int]] = []
        for p in placements:
            link = links.get(p.interface)
            if link is None:
                out[p.ip] = f"interface {p.interface} not found"
            elif not link.up:
                out[p.ip] = f"interface {p.interface} is down"
            else:
                todo.append((p, link.index))
        codes = await self._nl.batch(
            len(todo),
            lambda i, seq: rtnl.encode_addr_add(
                seq, todo[i][0].ip.packed, todo[i][0].prefixlen, todo[i][1]
            ),
        )
        for (p, index), code in zip(todo, codes, strict=True):
            if code in (0, errno.EEXIST):
                out[p.ip] = None
                if self.cache is not None:
                    # Do not wait for the event: a reconcile pass right after
                    # this must not take our own fresh address for a missing one.
                    self.cache.added(rtnl.AddrInfo(p.ip, index, p.prefixlen))
            else:
                out[p.ip] = f"add {p.ip}/{p.prefixlen} on {p.interface}: {_strerror(code)}"
        return out

    async def unplumb(self, placements: Sequence[Placement]) -> Results:
        """Remove each IP from its placement's interface, or wherever it really is.

        The first pass deletes on the named interface (or where the cache saw
        the IP); IPs not found there are looked up in one address dump and
        deleted where they are, so clean slate finds strays on any interface.
        """
        links = await self._resolve(placements)
        out: dict[IPAddress, str | None] = {}
        todo: list[tuple[IPAddress, int, int]] = []
        lost: list[IPAddress] = []
        cached = self.cache is not None and self.cache.synced
        for p in placements:
            if cached:
                assert self.cache is not None
                indexes = self.cache.interfaces_of(p.ip)
                if indexes:
                    c = self.cache
                    todo.extend((p.ip, i, c.prefixlen(p.ip, i, p.prefixlen)) for i in indexes)
                else:
                    out[p.ip] = None
            elif p.interface in links:
                todo.append((p.ip, links[p.interface].index, p.prefixlen))
            else:
                lost.append(p.ip)
        lost.extend(await self._delete(todo, out, retry_elsewhere=not cached))
        if lost:
            where = await self._locations(set(lost))
            again = [(ip, i, plen) for ip in lost for i, plen in where.get(ip, ())]
            for ip in lost:
                out.setdefault(ip, None)  # not on any interface: already gone
            await self._delete(again, out, retry_elsewhere=False)
        return out

    async def _delete(
        self,
        todo: list[tuple[IPAddress, int, int]],
        out: dict[IPAddress, str | None],
        *,
        retry_elsewhere: bool,
    ) -> list[IPAddress]:
        """Delete (ip, index, prefixlen) into ``out``; return IPs that were not there.

        The prefix length matters for IPv6 only (the kernel matches it there).
        """
        codes = await self._nl.batch(
            len(todo),
            lambda i, seq: rtnl.encode_addr_del(seq, todo[i][0].packed, todo[i][1], todo[i][2]),
        )
        missing: list[IPAddress] = []
        for (ip, index, _plen), code in zip(todo, codes, strict=True):
            if code in (errno.EADDRNOTAVAIL, errno.ENODEV) and retry_elsewhere:
                missing.append(ip)
            elif code in (0, errno.EADDRNOTAVAIL, errno.ENODEV):
                out.setdefault(ip, None)
                if self.cache is not None:
                    self.cache.removed(rtnl.AddrInfo(ip, index, 0))
            else:
                out[ip] = f"delete {ip}: {_strerror(code)}"
        return missing

    async def _locations(
        self, ips: set[IPAddress]
    ) -> dict[IPAddress, frozenset[tuple[int, int]]]:
        """(interface index, prefix length) of each of ``ips`` found in one dump."""
        where: dict[IPAddress, set[tuple[int, int]]] = {}
        for a in addrs_from_dump(await self._nl.dump(rtnl.RTM_GETADDR)):
            if a.ip in ips:
                where.setdefault(a.ip, set()).add((a.index, a.prefixlen))
        return {ip: frozenset(v) for ip, v in where.items()}

    async def present(self, managed: Collection[IPAddress]) -> frozenset[IPAddress]:
        if self.cache is not None and self.cache.synced:
            return self.cache.present(managed)
        wanted = managed if isinstance(managed, (set, frozenset)) else set(managed)
        return frozenset(
            a.ip for a in addrs_from_dump(await self._nl.dump(rtnl.RTM_GETADDR)) if a.ip in wanted
        )

    async def announce(self, placements: Sequence[Placement], *, all_hosts: bool) -> None:
        links = await self.refresh_links()  # a fresh up/down state: links are few
        neighbours: dict[int, list[rtnl.NeighInfo]] = {}
        if not all_hosts:
            for n in rtnl.parse_neighbours(await self._nl.dump(rtnl.RTM_GETNEIGH)):
                neighbours.setdefault(n.index, []).append(n)
        v4 = [p for p in placements if p.ip.version == 4]
        v6 = [p for p in placements if p.ip.version == 6]
        frames, skipped = plan_frames(v4, links, neighbours, all_hosts=all_hosts)
        adverts, skipped6 = plan_adverts(
            v6, links, neighbours, all_hosts=all_hosts, router=self.na_router
        )
        skipped += skipped6
        if skipped:
            log.warning(
                "gratuitous ARP skipped for %d IPs: interface missing (e.g. %s on %s)",
                len(skipped),
                skipped[0].ip,
                skipped[0].interface,
            )
        if frames:
            await self._garp.send(frames)
        if adverts:
            await self._ndisc.send(adverts)

    async def watch_carrier(
        self,
        report: Callable[[Carrier], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Carrier from link events: each event datagram (or overflow) re-reads the links.

        Links are few, so one dump per event keeps deletions, renames and a
        missed event (ENOBUFS) right without tracking message by message. The
        dumps use a socket of their own: a long plumbing batch holding the
        request socket must not delay a carrier loss.
        """
        sock = open_route_socket(self._netns, groups=rtnl.RTMGRP_LINK)
        dumper = NetlinkSocket(open_route_socket(self._netns))
        try:
            tsock = trio.socket.from_stdlib_socket(sock)
            last: dict[str, bool] | None = None
            started = False
            while True:
                links = rtnl.parse_links(await dumper.dump(rtnl.RTM_GETLINK))
                now = {link.name: link.up and link.running for link in links}
                if now != last:
                    report(now)
                    last = now
                if not started:
                    task_status.started()
                    started = True
                try:
                    await tsock.recv(DGRAM)
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    log.warning("carrier watch: link event overflow (ENOBUFS); re-reading links")
        finally:
            dumper.close()
            sock.close()

    @property
    def garp_sent(self) -> int:
        """Announcements sent: gratuitous ARP frames plus neighbour advertisements."""
        return self._garp.sent + self._ndisc.sent

    async def aclose(self) -> None:
        self._garp.close()
        self._ndisc.close()
        self._nl.close()


def _strerror(code: int) -> str:
    if code == -1:
        return "no answer from the kernel"
    return f"{errno.errorcode.get(code, str(code))} ({os.strerror(code)})"


@asynccontextmanager
async def open_netlink_plumber(
    *,
    netns: str | None = None,
    use_iflist_cache: bool = False,
    window: int = 256,
    garp_rate: float = DEFAULT_RATE,
    na_router: bool = False,
) -> AsyncIterator[NetlinkPlumber]:
    """A :class:`NetlinkPlumber` in ``netns`` (None: here), closed on exit.

    Refuses the root namespace when ``DURAVIP_REQUIRE_NETNS=1``.
    """
    nl = NetlinkSocket(open_route_socket(netns), window=window)
    plumber = NetlinkPlumber(
        nl,
        GarpSender(netns, rate=garp_rate),
        AddressCache() if use_iflist_cache else None,
        netns,
        na_router=na_router,
    )
    try:
        await plumber.refresh_links()
        if plumber.cache is None:
            yield plumber
            return
        events = open_route_socket(
            netns, groups=rtnl.RTMGRP_IPV4_IFADDR | rtnl.RTMGRP_IPV6_IFADDR | rtnl.RTMGRP_LINK
        )
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(run_cache, plumber.cache, events, nl, plumber.changed)
                yield plumber
                nursery.cancel_scope.cancel()
        finally:
            events.close()
    finally:
        await plumber.aclose()
