"""The resolver's hands: plumbing plus listeners, in the order that keeps SMTP honest.

Acquire: plumb (and GARP), then start the IP's listeners: a listener can only
bind once the address exists. Release: stop the listeners (drain open
sessions), then unplumb: a client never meets a plumbed IP with nobody behind it.
"""

from __future__ import annotations

import logging
from ipaddress import IPv4Address
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from duravip.daemon.node import Node

log = logging.getLogger("duravip.actuator")


class NodeActuator:
    def __init__(self, node: Node) -> None:
        self.node = node

    async def acquire(self, ips: frozenset[IPv4Address]) -> frozenset[IPv4Address]:
        present = await self.node.plumbing.ensure(ips)
        started: set[IPv4Address] = set()
        for ip in sorted(present):
            try:
                await self.node.listeners.start_ip(ip)
            except OSError as e:
                log.error("listener start failed", extra={"fields": {"ip": ip, "error": e}})
                continue
            started.add(ip)
        failed = present - started
        if failed:
            # Do not hold an IP whose service could not start.
            await self.node.plumbing.remove(frozenset(failed))
        if started:
            log.info("acquired", extra={"fields": {"count": len(started), "ips": _short(started)}})
        return frozenset(started)

    async def release(self, ips: frozenset[IPv4Address]) -> None:
        drain = self.node.config.cluster.drain_timeout
        async with trio.open_nursery() as n:
            for ip in ips:
                n.start_soon(self.node.listeners.stop_ip, ip, drain)
        await self.node.plumbing.remove(ips)
        log.info("released", extra={"fields": {"count": len(ips), "ips": _short(ips)}})


def _short(ips: frozenset[IPv4Address] | set[IPv4Address], limit: int = 8) -> str:
    s = sorted(ips)
    text = ",".join(map(str, s[:limit]))
    return text + (f",+{len(s) - limit}" if len(s) > limit else "")
