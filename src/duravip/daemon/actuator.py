"""The resolver's hands: plumbing plus listeners, in the order that keeps SMTP honest.

Acquire: plumb (and GARP), then start the IP's listeners: a listener can only
bind once the address exists. Release: stop the listeners (drain open
sessions), then unplumb: a client never meets a plumbed IP with nobody behind it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

import trio
from attrs import frozen

from duravip.ipaddr import IPAddress, ip_key

log = logging.getLogger("duravip.actuator")


class Plumbing(Protocol):
    async def ensure(self, ips: Iterable[IPAddress]) -> frozenset[IPAddress]: ...

    async def remove(self, ips: Iterable[IPAddress]) -> None: ...


class Listeners(Protocol):
    async def start_ip(self, ip: IPAddress) -> None: ...

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

    async def acquire(self, ips: frozenset[IPAddress]) -> frozenset[IPAddress]:
        plumbing, listeners = self.ctx.plumbing, self.ctx.listeners
        present = await plumbing.ensure(ips)
        started: set[IPAddress] = set()
        for ip in sorted(present, key=ip_key):
            try:
                await listeners.start_ip(ip)
            except OSError as e:
                log.error("listener start failed", extra={"fields": {"ip": ip, "error": e}})
                continue
            started.add(ip)
        failed = present - started
        if failed:
            # Do not hold an IP whose service could not start.
            await plumbing.remove(frozenset(failed))
        if started:
            log.info("acquired", extra={"fields": {"count": len(started), "ips": _short(started)}})
        return frozenset(started)

    async def release(self, ips: frozenset[IPAddress]) -> None:
        drain = self.ctx.drain_timeout()
        async with trio.open_nursery() as n:
            for ip in ips:
                n.start_soon(self.ctx.listeners.stop_ip, ip, drain)
        await self.ctx.plumbing.remove(ips)
        log.info("released", extra={"fields": {"count": len(ips), "ips": _short(ips)}})


def _short(ips: frozenset[IPAddress] | set[IPAddress], limit: int = 8) -> str:
    s = sorted(ips, key=ip_key)
    text = ",".join(map(str, s[:limit]))
    return text + (f",+{len(s) - limit}" if len(s) > limit else "")
