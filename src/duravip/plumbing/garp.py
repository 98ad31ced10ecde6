"""Gratuitous ARP: frame building (sans-IO) and a paced AF_PACKET sender.

Broadcast mode sends an ARP request with sender IP = target IP = the VIP from
the interface's MAC: every host that already has an entry for the VIP updates
it (hosts with ``arp_accept=0`` do not create one). Unicast mode
(``arp_all_hosts = false``) sends an ARP reply to each host of the interface's
neighbour table instead, so hosts that never talked to us hear nothing.

Frames are paced at ``rate`` per second (default 20,000: 20 frames per
millisecond) so that 10,240 VIPs do not hit a switch as one burst.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence

import trio

from duravip.ipaddr import IPAddress
from duravip.plumbing.base import Placement
from duravip.plumbing.netns import open_socket
from duravip.plumbing.pacing import Pacer
from duravip.plumbing.rtnl import LinkInfo, NeighInfo

log = logging.getLogger("duravip.plumbing")

ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6
ZERO_MAC = b"\x00" * 6
ARP_REQUEST = 1
ARP_REPLY = 2
#: Default pacing, frames per second.
DEFAULT_RATE = 20_000.0

_ARP = struct.Struct("!6s6sHHHBBH6s4s6s4s")


def arp_frame(
    *,
    op: int,
    dst_mac: bytes,
    src_mac: bytes,
    sender_ip: IPAddress,
    target_mac: bytes,
    target_ip: IPAddress,
) -> bytes:
    """An Ethernet ARP frame, padded to the 60-byte minimum."""
    frame = _ARP.pack(
        dst_mac,
        src_mac,
        ETH_P_ARP,
        1,
        0x0800,
        6,
        4,
        op,
        src_mac,
        sender_ip.packed,
        target_mac,
        target_ip.packed,
    )
    return frame.ljust(60, b"\x00")


def garp_request(mac: bytes, ip: IPAddress) -> bytes:
    """Broadcast gratuitous ARP request: "ip is at mac", sender = target = ip."""
    return arp_frame(
        op=ARP_REQUEST,
        dst_mac=BROADCAST,
        src_mac=mac,
        sender_ip=ip,
        target_mac=ZERO_MAC,
        target_ip=ip,
    )


def unicast_reply(mac: bytes, ip: IPAddress, peer: NeighInfo) -> bytes:
    """Unicast ARP reply to one known neighbour: "ip is at mac"."""
    return arp_frame(
        op=ARP_REPLY,
        dst_mac=peer.mac,
        src_mac=mac,
        sender_ip=ip,
        target_mac=peer.mac,
        target_ip=peer.ip,
    )


def plan_frames(
    placements: Sequence[Placement],
    links: Mapping[str, LinkInfo],
    neighbours: Mapping[int, Sequence[NeighInfo]],
    *,
    all_hosts: bool,
) -> tuple[list[tuple[str, bytes]], list[Placement]]:
    """One announcement round: (interface, frame) pairs, and placements that had no link."""
    frames: list[tuple[str, bytes]] = []
    skipped: list[Placement] = []
    for p in placements:
        link = links.get(p.interface)
        if link is None or len(link.mac) != 6:
            skipped.append(p)
            continue
        if all_hosts:
            frames.append((p.interface, garp_request(link.mac, p.ip)))
        else:
            for peer in neighbours.get(link.index, ()):
                if peer.ip != p.ip:
                    frames.append((p.interface, unicast_reply(link.mac, p.ip, peer)))
    return frames, skipped


class GarpSender:
    """AF_PACKET sockets per interface, frames sent at a bounded rate."""

    def __init__(self, netns: str | None, *, rate: float = DEFAULT_RATE) -> None:
        self._netns = netns
        self._socks: dict[str, trio.socket.SocketType] = {}
        self.rate = rate
        self.sent = 0

    def _sock(self, ifname: str) -> trio.socket.SocketType:
        s = self._socks.get(ifname)
        if s is None:
            # Protocol 0: a send-only packet socket (it receives nothing).
            raw = open_socket(self._netns, socket.AF_PACKET, socket.SOCK_RAW, 0)
            try:
                raw.bind((ifname, 0))
                raw.setblocking(False)
            except BaseException:
                raw.close()
                raise
            s = trio.socket.from_stdlib_socket(raw)
            self._socks[ifname] = s
        return s

    def forget(self, ifname: str) -> None:
        """Drop the socket of an interface that went away (it is bound to the old index)."""
        s = self._socks.pop(ifname, None)
        if s is not None:
            s.close()

    async def send(self, frames: Iterable[tuple[str, bytes]]) -> int:
        """Send ``frames`` paced at ``self.rate``; return how many went out."""
        pacer = Pacer(self.rate)
        failed: set[str] = set()
        for ifname, frame in frames:
            if ifname in failed:
                continue
            try:
                await self._sock(ifname).send(frame)
            except OSError as exc:
                log.warning("gratuitous ARP on %s failed: %s", ifname, exc)
                self.forget(ifname)
                failed.add(ifname)
                continue
            await pacer.sent()
        self.sent += pacer.count
        return pacer.count

    def close(self) -> None:
        for s in self._socks.values():
            s.close()
        self._socks.clear()
