"""The resolver's hands: plumbing plus listeners, in the order that keeps SMTP honest.

Acquire: start the IP's listeners (freebound: the address is not there yet),
then plumb and GARP, so no SYN ever meets the address without a socket.
Release: drain the sessions while the listening sockets still accept (new
clients get a banner and ``421``), unplumb, then close the sockets: a client
never meets a plumbed IP with nobody behind it (no reset).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import trio
from attrs import frozen

from duravip.ipaddr import IPAddress, ip_key

log = logging.getLogger("duravip.actuator")

#: After the unplumb: how long sessions accepted in the last moment get to read
#: their banner and ``421`` before the sockets close (the drain came before).
CLOSE_GRACE = 0.2


class Plumbing(Protocol):
    async def ensure(self, ips: Iterable[IPAddress]) -> frozenset[IPAddress]: ...

    async def remove(self, ips: Iterable[IPAddress]) -> None: ...


class Listeners(Protocol):
    async def start_ip(self, ip: IPAddress, *, freebind: bool = False) -> None: ...

    async def quiesce_ip(self, ip: IPAddress, drain_timeout: float) -> None: ...

    def close_ip(self, ip: IPAddress, grace: float) -> None: ...

    async def stop_ip(self, ip: IPAddress, drain_timeout: float) -> None: ...


@frozen
class ActuatorContext:
    """What the actuator touches, and nothing else."""

    plumbing: Plumbing
    listeners: Listeners
    #: Read at each release: a reload may change ``cluster.drain_timeout``.
    drain_timeout: Callable[[], float]


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
        """Drain sessions (sockets still accepting), unplumb, then close the sockets.

        Closing before the unplumb would reset every SYN that arrives in
        between; after it, clients' SYNs no longer reach this host's sockets
        once the new holder's gratuitous ARP is in.
        """
        drain = self.ctx.drain_timeout()
        listeners = self.ctx.listeners
        async with trio.open_nursery() as n:
            for ip in ips:
                n.start_soon(listeners.quiesce_ip, ip, drain)
        await self.ctx.plumbing.remove(ips)
        for ip in ips:
            # Not awaited: the new holder waits for our announcement, not for our sessions.
            listeners.close_ip(ip, min(drain, CLOSE_GRACE))
        log.info("released", extra={"fields": {"count": len(ips), "ips": _short(ips)}})


def _short(ips: frozenset[IPAddress] | set[IPAddress], limit: int = 8) -> str:
    s = sorted(ips, key=ip_key)
    text = ",".join(map(str, s[:limit]))
    return text + (f",+{len(s) - limit}" if len(s) > limit else "")
