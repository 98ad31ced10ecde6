"""The resolver's hands: plumbing plus listeners, in the order that keeps SMTP honest.

Acquire: start the IP's listeners (freebound: the address is not there yet),
then plumb and GARP, so no SYN ever meets the address without a socket.
Release: drain the sessions while the listening sockets still accept (new
clients get a banner and ``421``), let the deliveries from the IPs read their
last reply, gate the listeners (new SYNs dropped silently and handed to the
:mod:`~duravip.plumbing.relay`, which passes them on to the new holder once it
announces itself), unplumb, then close the sockets: a client never meets a
plumbed IP with nobody behind it (no reset), and a SYN that arrives in the
break-before-make gap is delayed, not lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import trio
from attrs import field, frozen

from duravip.ipaddr import IPAddress, ip_key
from duravip.plumbing.relay import NoRelay

log = logging.getLogger("duravip.actuator")

#: After the unplumb: how long sessions accepted in the last moment get to read
#: their banner and ``421`` before the sockets close (the drain came before).
CLOSE_GRACE = 0.2
#: After gating the listeners, before the unplumb: handshakes the kernel answered
#: just before the gate complete and their sessions write the banner.
GATE_GRACE = 0.02


class Plumbing(Protocol):
    async def ensure(self, ips: Iterable[IPAddress]) -> frozenset[IPAddress]: ...

    async def remove(self, ips: Iterable[IPAddress]) -> None: ...


class Listeners(Protocol):
    async def start_ip(self, ip: IPAddress, *, freebind: bool = False) -> None: ...

    async def quiesce_ip(self, ip: IPAddress, drain_timeout: float) -> None: ...

    def gate_syns(self, ip: IPAddress) -> int: ...

    def close_ip(self, ip: IPAddress, grace: float) -> None: ...

    async def stop_ip(self, ip: IPAddress, drain_timeout: float) -> None: ...


class Capture(Protocol):
    def start(self) -> None: ...


class Relay(Protocol):
    def open(self, ips: Iterable[IPAddress]) -> Capture: ...


@asynccontextmanager
async def _no_quiesce(ips: frozenset[IPAddress]) -> AsyncIterator[None]:
    yield


@frozen
class ActuatorContext:
    """What the actuator touches, and nothing else."""

    plumbing: Plumbing
    listeners: Listeners
    #: Read at each release: a reload may change ``cluster.drain_timeout``.
    drain_timeout: Callable[[], float]
    #: The handover relay (none: SYNs in the gap are lost, as with the in-memory plumber).
    relay: Relay = field(factory=NoRelay)
    #: Held around the unplumb: the deliveries from the IPs read their last reply first.
    quiesce: Callable[[frozenset[IPAddress]], AbstractAsyncContextManager[None]] = _no_quiesce


class NodeActuator:
    def __init__(self, ctx: ActuatorContext) -> None:
        self.ctx = ctx
        #: Wall-clock time each IP's listeners last started (the takeover latency budget).
        self.bound_at: dict[IPAddress, float] = {}

    async def acquire(self, ips: frozenset[IPAddress]) -> frozenset[IPAddress]:
        """Bind the listeners (``IP_FREEBIND``: before the address exists), then plumb and GARP.

        Bound first, every SYN the gratuitous ARP draws here meets a listening
        socket: no reset between the address add and the bind.
        """
        plumbing, listeners = self.ctx.plumbing, self.ctx.listeners
        started: set[IPAddress] = set()
        for ip in sorted(ips, key=ip_key):
            try:
                await listeners.start_ip(ip, freebind=True)
            except OSError as e:
                log.error("listener start failed", extra={"fields": {"ip": ip, "error": e}})
                continue
            started.add(ip)
            self.bound_at[ip] = time.time()
        present = await plumbing.ensure(frozenset(started)) if started else frozenset()
        got = started & present
        for ip in sorted(started - got, key=ip_key):
            # Not plumbed: no listener either (nothing was accepted on it).
            await listeners.stop_ip(ip, 0.0)
        if got:
            log.info("acquired", extra={"fields": {"count": len(got), "ips": _short(got)}})
        return frozenset(got)

    async def release(self, ips: frozenset[IPAddress]) -> None:
        """Drain, quiesce the deliveries, gate and relay SYNs, unplumb, close the sockets.

        Closing before the unplumb would reset every SYN that arrives in
        between; after it, clients' SYNs no longer reach this host's sockets
        once the new holder's gratuitous ARP is in, and the relay hands on
        those that come before.
        """
        ctx = self.ctx
        drain = ctx.drain_timeout()
        listeners = ctx.listeners
        async with trio.open_nursery() as n:
            for ip in ips:
                n.start_soon(listeners.quiesce_ip, ip, drain)
        async with ctx.quiesce(ips):
            capture = ctx.relay.open(ips)
            for ip in ips:
                listeners.gate_syns(ip)
            capture.start()
            await trio.sleep(GATE_GRACE)
            await ctx.plumbing.remove(ips)
        for ip in ips:
            # Not awaited: the new holder waits for our announcement, not for our sessions.
            listeners.close_ip(ip, min(drain, CLOSE_GRACE))
        log.info("released", extra={"fields": {"count": len(ips), "ips": _short(ips)}})


def _short(ips: frozenset[IPAddress] | set[IPAddress], limit: int = 8) -> str:
    s = sorted(ips, key=ip_key)
    text = ",".join(map(str, s[:limit]))
    return text + (f",+{len(s) - limit}" if len(s) > limit else "")
