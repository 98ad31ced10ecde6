"""Thin Trio driver of the SWIM core: one UDP socket, one TCP listener.

It feeds the core with ``trio.current_time()``, sends what it emits, performs
its TCP exchanges and publishes a :class:`Membership` snapshot whenever the
membership changed.

A TCP message is two 4-byte length-prefixed frames: a small sealed header that
announces the length of the second, then the sealed message itself. A server
reads at most :data:`FIRST_FRAME_MAX` bytes from a peer that has not proven the
key, each frame under its own deadline, and serves at most
:data:`MAX_INBOUND_STREAMS` connections at once, :data:`MAX_INBOUND_PER_IP` per
peer IP (more are closed at once).
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import trio
import trio_util
from attrs import frozen

from duravip.swim.core import StreamRequest, Swim
from duravip.swim.crypto import Keyring
from duravip.swim.members import Addr, Member
from duravip.swim.settings import Timers

log = logging.getLogger(__name__)

#: Largest TCP frame accepted after an authentic header (a push-pull of 10,000 members
#: or a large view fits).
MAX_FRAME = 32 * 1024 * 1024
#: Largest first frame (the sealed length header) read before the peer proved the key.
FIRST_FRAME_MAX = 256
#: Deadline for the header frame of an inbound exchange.
HEADER_TIMEOUT = 2.0
#: Deadline for serving one inbound TCP exchange (the large frame included).
SERVER_TIMEOUT = 10.0
#: Inbound TCP exchanges served at once, in all and per peer IP (a real peer has a
#: push-pull and a few view fetches in flight at most); further connections are closed
#: at once, so one keyless host cannot take every slot.
MAX_INBOUND_STREAMS = 128
MAX_INBOUND_PER_IP = 16
MAX_DATAGRAM = 65536


@frozen
class Membership:
    """The snapshot the election reads: every known member, self included."""

    local: str
    members: Mapping[str, Member]


class FrameError(Exception):
    """A TCP peer sent a frame that is too large or cut short."""


async def _read_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(min(65536, n - len(buf)))
        if not chunk:
            raise FrameError("connection closed mid-frame")
        buf += chunk
    return bytes(buf)


async def read_frame(stream: trio.abc.ReceiveStream, limit: int = MAX_FRAME) -> bytes:
    n = int.from_bytes(await _read_exactly(stream, 4), "big")
    if n > limit:
        raise FrameError(f"frame of {n} bytes")
    return await _read_exactly(stream, n)


def frame(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def sealed_message(swim: Swim, data: bytes) -> bytes:
    """``data`` (a sealed stream frame) preceded by its sealed length header."""
    return frame(swim.stream_header(len(data))) + frame(data)


async def read_sealed_message(
    swim: Swim, stream: trio.abc.ReceiveStream, header_timeout: float
) -> bytes:
    """Read a header frame (small, authenticated before anything else), then the frame
    it announces; :class:`FrameError` on anything else."""
    with trio.move_on_after(header_timeout) as cs:
        header = await read_frame(stream, FIRST_FRAME_MAX)
    if cs.cancelled_caught:
        raise FrameError("header frame too slow")
    n = swim.open_stream_header(header)
    if n is None:
        raise FrameError("header frame not authentic")
    if n > MAX_FRAME:
        raise FrameError(f"announced frame of {n} bytes")
    data = await read_frame(stream, n)
    if len(data) != n:
        raise FrameError("frame shorter than announced")
    return data


class MembershipService:
    """Handle of a running membership service (returned by ``task_status.started``)."""

    def __init__(self, swim: Swim, udp: socket.socket, nursery: trio.Nursery) -> None:
        self._swim = swim
        self._udp_raw = udp  # non-blocking; sendto from sync code
        self._udp = trio.socket.from_stdlib_socket(udp)
        self._nursery = nursery
        self._wake = trio.Event()
        self._inbound = 0
        self._inbound_by_ip: dict[str, int] = {}
        self.snapshot: trio_util.AsyncValue[Membership] = trio_util.AsyncValue(
            self._make_snapshot()
        )

    @property
    def counters(self) -> Mapping[str, int]:
        return MappingProxyType(self._swim.counters)

    @property
    def name(self) -> str:
        return self._swim.name

    def set_meta(self, meta: bytes) -> None:
        self._swim.set_meta(meta, trio.current_time())
        self._kick()

    async def leave(self, timeout: float) -> None:
        """Announce ``left`` and wait (at most ``timeout``) until it has been gossiped."""
        self._swim.leave(trio.current_time())
        self._kick()
        with trio.move_on_after(timeout):
            while not self._swim.left_done():
                await trio.sleep(self._swim.timers.gossip_interval / 2)

    def failure_marks(self, name: str) -> dict[str, float]:
        """Wall-clock (``time.time()``) stamps of ``name``'s last ack, suspicion and death.

        The core runs on ``trio.current_time()``; converted here with the offset
        of the two clocks now, so stamps compare across nodes sharing one host.
        """
        offset = time.time() - trio.current_time()
        return {k: v + offset for k, v in self._swim.marks(name).items()}

    def set_keyring(self, keyring: Keyring) -> None:
        self._swim.set_keyring(keyring)

    def set_timers(self, timers: Timers) -> None:
        self._swim.set_timers(timers)
        self._kick()

    # ----------------------------------------------------------------- internals

    def _make_snapshot(self) -> Membership:
        return Membership(self._swim.name, MappingProxyType(dict(self._swim.members())))

    def _kick(self) -> None:
        """Something changed: flush output and recompute the next deadline."""
        self._flush()
        self._wake.set()

    def _flush(self) -> None:
        swim = self._swim
        for data, addr in swim.outgoing():
            self._send_now(data, addr)
        for req in swim.stream_requests():
            self._nursery.start_soon(self._stream, req)
        if swim.events():
            self.snapshot.value = self._make_snapshot()

    def _send_now(self, data: bytes, addr: Addr) -> None:
        # UDP sendto on a non-blocking socket: EAGAIN means a full buffer, i.e. a lost packet
        try:
            self._udp_raw.sendto(data, addr)
        except BlockingIOError:
            self._swim.counters["send_dropped"] += 1
        except OSError as exc:
            self._swim.counters["send_errors"] += 1
            log.debug("sendto %s failed: %s", addr, exc)

    async def _stream(self, req: StreamRequest) -> None:
        resp: bytes | None = None
        with trio.move_on_after(req.timeout):
            try:
                stream = await trio.open_tcp_stream(req.addr[0], req.addr[1])
                async with stream:
                    await stream.send_all(sealed_message(self._swim, req.data))
                    resp = await read_sealed_message(self._swim, stream, req.timeout)
            except (OSError, trio.BrokenResourceError, FrameError) as exc:
                log.debug("%s exchange with %s failed: %s", req.kind, req.addr, exc)
        self._swim.stream_response(req, resp, trio.current_time())
        self._kick()

    async def _serve_conn(self, stream: trio.SocketStream) -> None:
        try:
            peer = stream.socket.getpeername()
        except OSError:
            await trio.aclose_forcefully(stream)
            return
        ip = str(peer[0])
        if (
            self._inbound >= MAX_INBOUND_STREAMS
            or self._inbound_by_ip.get(ip, 0) >= MAX_INBOUND_PER_IP
        ):
            self._swim.counters["dropped_stream_busy"] += 1
            await trio.aclose_forcefully(stream)
            return
        self._inbound += 1
        self._inbound_by_ip[ip] = self._inbound_by_ip.get(ip, 0) + 1
        try:
            async with stream:
                try:
                    with trio.fail_after(SERVER_TIMEOUT):
                        request = await read_sealed_message(self._swim, stream, HEADER_TIMEOUT)
                        resp = self._swim.handle_stream(
                            request, (peer[0], peer[1]), trio.current_time()
                        )
                        self._kick()
                        if resp:
                            await stream.send_all(sealed_message(self._swim, resp))
                except (OSError, trio.BrokenResourceError, trio.TooSlowError, FrameError) as exc:
                    self._swim.counters["stream_errors"] += 1
                    log.debug("inbound exchange failed: %s", exc)
        finally:
            self._inbound -= 1
            left = self._inbound_by_ip.pop(ip) - 1
            if left:
                self._inbound_by_ip[ip] = left

    async def _recv_loop(self) -> None:
        while True:
            try:
                data, addr = await self._udp.recvfrom(MAX_DATAGRAM)
            except OSError as exc:  # ECONNREFUSED & co: an ICMP error is queued
                self._swim.counters["recv_errors"] += 1
                log.debug("recvfrom: %s", exc)
                self._drain_errors()
                continue
            self._swim.receive_datagram(data, (addr[0], addr[1]), trio.current_time())
            self._kick()

    def _drain_errors(self) -> None:
        """Read IP_RECVERR reports: a port unreachable from a peer hints its process died.

        The hint may only move our probe of it to the indirect stage early; it never
        suspects anybody by itself.
        """
        for _ in range(64):
            try:
                _, _, _, addr = self._udp_raw.recvmsg(1, 512, socket.MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.debug("error queue: %s", exc)
                break
            if isinstance(addr, tuple) and len(addr) >= 2:
                self._swim.hint_unreachable((addr[0], addr[1]), trio.current_time())
        self._kick()

    async def _timer_loop(self) -> None:
        while True:
            deadline = self._swim.next_deadline()
            now = trio.current_time()
            if deadline > now:
                with trio.move_on_at(deadline if math.isfinite(deadline) else now + 3600):
                    await self._wake.wait()
            else:
                await trio.sleep(0.001)  # overdue: never spin
            self._wake = trio.Event()
            self._swim.tick(trio.current_time())
            self._flush()


async def serve(
    *,
    name: str,
    bind: Addr,
    cluster: str,
    timers: Timers,
    keyring: Keyring,
    seeds: Sequence[Addr] = (),
    meta: bytes = b"",
    epoch: int | None = None,
    task_status: trio.TaskStatus[MembershipService] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the membership service until cancelled; ``started(service)`` once bound.

    ``epoch`` (default: the wall clock in ns) must grow from one run of the node to
    the next: peers reject frames of an older boot as replays.
    """
    family = socket.AF_INET6 if ":" in bind[0] else socket.AF_INET  # an IPv6 main address
    udp = socket.socket(family, socket.SOCK_DGRAM)
    tcp = trio.socket.socket(family, socket.SOCK_STREAM)
    with udp, tcp:
        udp.setblocking(False)
        ip_recverr = getattr(socket, "IP_RECVERR", 11)  # Linux value when Python lacks it
        try:
            udp.setsockopt(socket.IPPROTO_IP, ip_recverr, 1)
        except OSError as exc:
            log.debug("IP_RECVERR unavailable: %s", exc)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        udp.bind(bind)
        await tcp.bind(bind)
        tcp.listen(128)
        listener = trio.SocketListener(tcp)
        swim = Swim(
            name=name,
            addr=bind,
            cluster=cluster,
            timers=timers,
            keyring=keyring,
            seeds=seeds,
            meta=meta,
            now=trio.current_time(),
            epoch=time.time_ns() if epoch is None else epoch,
        )
        async with trio.open_nursery() as nursery:
            service = MembershipService(swim, udp, nursery)
            nursery.start_soon(service._recv_loop)
            nursery.start_soon(service._timer_loop)
            nursery.start_soon(trio.serve_listeners, service._serve_conn, [listener])
            service._flush()
            task_status.started(service)
