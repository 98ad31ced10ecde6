"""Handover relay: SYNs that still reach the old holder of a released IP go on to the new one.

Why: a planned move (fail-back, ``move``, drain, graceful stop) is
break-before-make: the old holder unplumbs, then the new one plumbs and sends
gratuitous ARP. Until a client has heard that ARP its SYNs still go to the old
holder's MAC, where the kernel (the address gone) drops them, and the client
tries again only after its 1 s SYN timeout. So for a bounded window after a
release the old holder captures those SYNs (a packet socket with a kernel
filter, opened before its listeners stop taking SYNs) and, once the new
holder's gratuitous ARP or unsolicited NA names its MAC, sends each one on to
that MAC, the Ethernet header rewritten and the TCP checksum recomputed (a
captured frame may carry a partial, offloaded one). The new holder's kernel
answers the client directly. The address is never on two nodes, and no
connection is lost to the gap.

The frame handling (:func:`classify`, :func:`forward_frame`) is sans-IO;
:class:`HandoverRelay` is the small Trio driver. A relay only ever sends frames
that were addressed to this host's MAC, for IPs it released in the last
:data:`RELAY_WINDOW` seconds, to a MAC that announced that IP on the same link.
"""

from __future__ import annotations

import functools
import logging
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from ipaddress import IPv4Address, IPv6Address

import attrs
import trio

from duravip import bpf
from duravip.config.model import Topology
from duravip.ipaddr import IPAddress
from duravip.plumbing.base import place
from duravip.plumbing.netlink import NetlinkPlumber
from duravip.plumbing.netns import open_socket

__all__ = [
    "RELAY_LIMIT",
    "RELAY_WINDOW",
    "Announce",
    "Capture",
    "HandoverRelay",
    "NoRelay",
    "Syn",
    "classify",
    "forward_frame",
]

log = logging.getLogger("duravip.plumbing")

#: How long after a release SYNs for its IPs are relayed (a client's ARP cache
#: follows the new holder's first gratuitous ARP; a lost one is sent again).
RELAY_WINDOW = 2.0
#: SYNs held per window while the new holder's MAC is not known yet.
RELAY_LIMIT = 1024

ETH_P_ALL = 0x0003
PACKET_HOST = 0
PACKET_OTHERHOST = 3
PACKET_OUTGOING = 4
_TCP = 6


@attrs.frozen
class Syn:
    """A TCP SYN (no ACK) to ``ip``."""

    ip: IPAddress


@attrs.frozen
class Announce:
    """A host says ``ip`` is at ``mac`` (ARP request or reply, neighbour advert)."""

    ip: IPAddress
    mac: bytes


def classify(frame: bytes) -> Syn | Announce | None:
    """What an Ethernet frame means to the relay (None: nothing; never raises)."""
    if len(frame) < 14:
        return None
    etype = frame[12:14]
    if etype == b"\x08\x06":
        if len(frame) < 42 or frame[14:20] != b"\x00\x01\x08\x00\x06\x04":
            return None
        spa = frame[28:32]
        if spa == b"\x00\x00\x00\x00":
            return None  # a probe (RFC 5227): nobody claims anything
        return Announce(IPv4Address(spa), bytes(frame[22:28]))
    if etype == b"\x08\x00":
        if len(frame) < 34 or frame[14] >> 4 != 4 or frame[23] != _TCP:
            return None
        ihl = (frame[14] & 0x0F) * 4
        if ihl < 20 or len(frame) < 14 + ihl + 14:
            return None
        if frame[14 + ihl + 13] & (bpf.SYN | bpf.ACK) != bpf.SYN:
            return None
        return Syn(IPv4Address(frame[30:34]))
    if etype == b"\x86\xdd":
        if len(frame) < 54 or frame[14] >> 4 != 6:
            return None
        nh = frame[20]
        if nh == _TCP and len(frame) >= 54 + 14:
            if frame[54 + 13] & (bpf.SYN | bpf.ACK) != bpf.SYN:
                return None
            return Syn(IPv6Address(frame[38:54]))
        if nh == 58 and len(frame) >= 78 and frame[54] == 136:
            return Announce(IPv6Address(frame[62:78]), _na_mac(frame))
    return None


def _na_mac(frame: bytes) -> bytes:
    """The target link-layer address option of an NA, else the frame's source MAC."""
    off = 78
    while off + 8 <= len(frame):
        otype, olen = frame[off], frame[off + 1] * 8
        if olen == 0:
            break
        if otype == 2 and olen >= 8:
            return bytes(frame[off + 2 : off + 8])
        off += olen
    return bytes(frame[6:12])


def inet_checksum(data: bytes) -> int:
    """RFC 1071 one's-complement sum."""
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def forward_frame(frame: bytes, dst_mac: bytes, src_mac: bytes) -> bytes | None:
    """``frame`` readdressed to ``dst_mac`` from ``src_mac``, its TCP checksum made whole.

    Trailing Ethernet padding is cut (the IP length rules). None for a frame
    :func:`classify` would not call a SYN.
    """
    if not isinstance(classify(frame), Syn):
        return None
    if frame[12:14] == b"\x08\x00":
        ihl = (frame[14] & 0x0F) * 4
        total = int.from_bytes(frame[16:18], "big")
        if total < ihl + 20 or 14 + total > len(frame):
            return None
        ip_header, tcp = frame[14 : 14 + ihl], bytearray(frame[14 + ihl : 14 + total])
        pseudo = ip_header[12:20] + struct.pack("!BBH", 0, _TCP, len(tcp))
        head = frame[12 : 14 + ihl]
    else:
        plen = int.from_bytes(frame[18:20], "big")
        if plen < 20 or 54 + plen > len(frame):
            return None
        tcp = bytearray(frame[54 : 54 + plen])
        pseudo = frame[22:54] + struct.pack("!IxxxB", len(tcp), _TCP)
        head = frame[12:54]
    tcp[16:18] = b"\x00\x00"
    tcp[16:18] = inet_checksum(pseudo + bytes(tcp)).to_bytes(2, "big")
    return dst_mac + src_mac + head + bytes(tcp)


@attrs.define
class _Window:
    """One interface's capture after one release."""

    ips: frozenset[IPAddress]
    raw: socket.socket
    mac: bytes
    #: IP -> the MAC that announced it (the new holder).
    macs: dict[IPAddress, bytes] = attrs.Factory(dict)
    #: SYN frames waiting for their IP's new MAC.
    pending: dict[IPAddress, list[bytes]] = attrs.Factory(dict)
    held: int = 0


class Capture:
    """Packet sockets opened for one release, not yet read (see :meth:`HandoverRelay.open`)."""

    def __init__(self, relay: HandoverRelay | None, windows: list[_Window]) -> None:
        self._relay = relay
        self._windows = windows

    def start(self) -> None:
        """The listeners are gated now: forget what queued before, relay what comes after.

        Frames queued so far reached the kernel while the listeners still took
        SYNs, so the kernel answered them itself.
        """
        if self._relay is None:
            return
        for w in self._windows:
            while True:
                try:
                    w.raw.recv(65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
            self._relay._start(w)
        self._windows = []


class NoRelay:
    """No packet sockets (the in-memory plumber, tests): a release relays nothing."""

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}

    def open(self, ips: Iterable[IPAddress]) -> Capture:
        return Capture(None, [])


class HandoverRelay:
    """Opens one capture per interface per release; every window lives in ``nursery``."""

    def __init__(
        self,
        *,
        netns: str | None,
        topology: Callable[[], Sequence[Topology]],
        nursery: trio.Nursery,
        window: float = RELAY_WINDOW,
        limit: int = RELAY_LIMIT,
    ) -> None:
        self._netns = netns
        self._topology = topology
        self._nursery = nursery
        self.window = window
        self.limit = limit
        self.counters: dict[str, int] = {
            "relay_windows": 0,
            "relay_syns_forwarded": 0,
            "relay_syns_expired": 0,
            "relay_errors": 0,
        }

    def open(self, ips: Iterable[IPAddress]) -> Capture:
        """Start capturing for ``ips`` now (synchronous: before the listeners are gated)."""
        by_iface: dict[str, set[IPAddress]] = {}
        topology = self._topology()
        for ip in ips:
            p = place(ip, topology)
            if p is not None:
                by_iface.setdefault(p.interface, set()).add(ip)
        windows: list[_Window] = []
        for ifname, group in sorted(by_iface.items()):
            try:
                raw = self._socket(ifname)
            except OSError as exc:
                self.counters["relay_errors"] += 1
                log.warning("handover relay on %s not possible: %s", ifname, exc)
                continue
            windows.append(_Window(frozenset(group), raw, bytes(raw.getsockname()[4])))
        return Capture(self, windows)

    def _socket(self, ifname: str) -> socket.socket:
        # Protocol 0 receives nothing until the bind: the filter is in place first.
        raw = open_socket(self._netns, socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            bpf.attach(raw, bpf.CAPTURE_HANDOVER)
            raw.bind((ifname, ETH_P_ALL))
            raw.setblocking(False)
        except BaseException:
            raw.close()
            raise
        return raw

    def _start(self, w: _Window) -> None:
        self.counters["relay_windows"] += 1
        self._nursery.start_soon(self._run, w)

    async def _run(self, w: _Window) -> None:
        sock = trio.socket.from_stdlib_socket(w.raw)
        forwarded = self.counters["relay_syns_forwarded"]
        try:
            with trio.move_on_after(self.window):
                while True:
                    data, addr = await sock.recvfrom(65536)
                    self._handle(w, data, int(addr[2]))
        except OSError as exc:
            self.counters["relay_errors"] += 1
            log.warning("handover relay stopped: %s", exc)
        finally:
            sock.close()
            expired = sum(len(v) for v in w.pending.values())
            self.counters["relay_syns_expired"] += expired
            sent = self.counters["relay_syns_forwarded"] - forwarded
            if sent or expired:
                log.info(
                    "handover relay: %d SYN(s) forwarded, %d expired (new holder unknown)",
                    sent,
                    expired,
                )

    def _handle(self, w: _Window, frame: bytes, pkttype: int) -> None:
        if pkttype == PACKET_OUTGOING:
            return
        what = classify(frame)
        if isinstance(what, Announce):
            if what.ip in w.ips and what.mac != w.mac and len(what.mac) == 6:
                w.macs[what.ip] = what.mac
                for held in w.pending.pop(what.ip, ()):
                    self._send(w, held, what.mac)
        elif isinstance(what, Syn) and pkttype == PACKET_HOST and what.ip in w.ips:
            mac = w.macs.get(what.ip)
            if mac is not None:
                self._send(w, frame, mac)
            elif w.held < self.limit:
                w.pending.setdefault(what.ip, []).append(frame)
                w.held += 1
            else:
                self.counters["relay_syns_expired"] += 1

    def _send(self, w: _Window, frame: bytes, mac: bytes) -> None:
        out = forward_frame(frame, mac, w.mac)
        if out is None:
            return
        try:
            w.raw.send(out)
        except OSError as exc:
            self.counters["relay_errors"] += 1
            log.debug("handover relay send failed: %s", exc)
            return
        self.counters["relay_syns_forwarded"] += 1


async def start(
    nursery: trio.Nursery, plumber: object, topology: Callable[[], Sequence[Topology]]
) -> HandoverRelay | NoRelay:
    """A relay serving in ``nursery`` for the kernel plumber; :class:`NoRelay` for any other."""
    if not isinstance(plumber, NetlinkPlumber):
        return NoRelay()
    relay: HandoverRelay = await nursery.start(
        functools.partial(serve, netns=plumber.netns, topology=topology)
    )
    return relay


async def serve(
    *,
    netns: str | None,
    topology: Callable[[], Sequence[Topology]],
    task_status: trio.TaskStatus[HandoverRelay] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Own the relay's windows until cancelled."""
    async with trio.open_nursery() as nursery:
        task_status.started(HandoverRelay(netns=netns, topology=topology, nursery=nursery))
        await trio.sleep_forever()
