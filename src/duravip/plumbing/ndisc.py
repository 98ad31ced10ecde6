"""Unsolicited neighbour advertisements: the IPv6 counterpart of gratuitous ARP.

RFC 4861 section 7.2.6: a node whose link-layer address for an IPv6 address
changed may send unsolicited NAs to the all-nodes group ``ff02::1`` with the
Override flag set, so peers that have a neighbour entry for the address
replace its MAC (peers without one do not create it, as with ARP and
``arp_accept=0``; Linux 5.18+ creates one only with ``accept_untracked_na``).

Messages go out of one raw ICMPv6 socket in the node's namespace: hop limit
255 (receivers drop NDP with any other), source = the DuraVIP itself and the
outgoing interface both chosen per message with ``IPV6_PKTINFO``; the kernel
fills in the ICMPv6 checksum. With ``arp_all_hosts = false`` an NA is sent
unicast to each IPv6 neighbour of the interface instead of to ``ff02::1``.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from ipaddress import IPv6Address

import attrs
import trio

from duravip.ipaddr import IPAddress
from duravip.plumbing.base import Placement
from duravip.plumbing.netns import open_socket
from duravip.plumbing.pacing import Pacer
from duravip.plumbing.rtnl import LinkInfo, NeighInfo

log = logging.getLogger("duravip.plumbing")

ALL_NODES = IPv6Address("ff02::1")
ICMPV6_NA = 136
NA_ROUTER = 0x80
NA_SOLICITED = 0x40
NA_OVERRIDE = 0x20
OPT_TARGET_LLADDR = 2

_NA = struct.Struct("!BBHB3x16sBB6s")
_PKTINFO = struct.Struct("=16sI")


def na_message(target: IPAddress, mac: bytes, *, router: bool = False) -> bytes:
    """ICMPv6 NA body (checksum 0: the kernel computes it), Override set, with our MAC."""
    flags = NA_OVERRIDE | (NA_ROUTER if router else 0)
    return _NA.pack(ICMPV6_NA, 0, 0, flags, target.packed, OPT_TARGET_LLADDR, 1, mac)


def parse_na(data: bytes) -> tuple[IPv6Address, int, bytes | None]:
    """(target, flags, target link-layer address) of an NA body (for tests and the lab)."""
    if len(data) < 24 or data[0] != ICMPV6_NA:
        raise ValueError("not a neighbour advertisement")
    target = IPv6Address(data[8:24])
    mac: bytes | None = None
    off = 24
    while off + 2 <= len(data):
        otype, olen = data[off], data[off + 1]
        if olen == 0:
            break
        if otype == OPT_TARGET_LLADDR and olen == 1:
            mac = data[off + 2 : off + 8]
        off += 8 * olen
    return target, data[4], mac


@attrs.frozen
class Advert:
    """One NA to send: from ``source`` on ``index`` to ``dst``."""

    interface: str
    index: int
    source: IPAddress
    dst: IPAddress
    message: bytes


def plan_adverts(
    placements: Sequence[Placement],
    links: Mapping[str, LinkInfo],
    neighbours: Mapping[int, Sequence[NeighInfo]],
    *,
    all_hosts: bool,
    router: bool = False,
) -> tuple[list[Advert], list[Placement]]:
    """One announcement round for IPv6 placements, and those that had no link."""
    out: list[Advert] = []
    skipped: list[Placement] = []
    for p in placements:
        link = links.get(p.interface)
        if link is None or len(link.mac) != 6:
            skipped.append(p)
            continue
        msg = na_message(p.ip, link.mac, router=router)
        if all_hosts:
            out.append(Advert(p.interface, link.index, p.ip, ALL_NODES, msg))
        else:
            for peer in neighbours.get(link.index, ()):
                if peer.ip.version == 6 and peer.ip != p.ip:
                    out.append(Advert(p.interface, link.index, p.ip, peer.ip, msg))
    return out, skipped


class NdiscSender:
    """One raw ICMPv6 socket, adverts sent at a bounded rate (like :class:`GarpSender`)."""

    def __init__(self, netns: str | None, *, rate: float) -> None:
        self._netns = netns
        self._sock: trio.socket.SocketType | None = None
        self.rate = rate
        self.sent = 0

    def _socket(self) -> trio.socket.SocketType:
        if self._sock is None:
            raw = open_socket(self._netns, socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
            try:
                raw.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
                raw.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
                raw.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
                # Send only: a filter that passes nothing keeps the receive queue empty.
                raw.setsockopt(socket.IPPROTO_ICMPV6, 1, b"\xff" * 32)  # ICMP6_FILTER
                raw.setblocking(False)
            except BaseException:
                raw.close()
                raise
            self._sock = trio.socket.from_stdlib_socket(raw)
        return self._sock

    async def send(self, adverts: Iterable[Advert]) -> int:
        """Send ``adverts`` paced at ``self.rate``; return how many went out."""
        pacer = Pacer(self.rate)
        failed: set[str] = set()
        for a in adverts:
            if a.interface in failed:
                continue
            info = _PKTINFO.pack(a.source.packed, a.index)
            anc = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, info)]
            try:
                await self._socket().sendmsg([a.message], anc, 0, (str(a.dst), 0, 0, a.index))
            except OSError as exc:
                log.warning("neighbour advertisement on %s failed: %s", a.interface, exc)
                failed.add(a.interface)
                continue
            await pacer.sent()
        self.sent += pacer.count
        return pacer.count

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
