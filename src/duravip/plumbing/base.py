"""The plumbing contract: where an IP goes and what a plumber can do.

Everything above the plumbing layer (worker, election actuator, tests) codes
against :class:`Plumber`, so the netlink implementation and the in-memory fake
are interchangeable.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Protocol

import attrs
import trio

from duravip.config.model import Topology
from duravip.ipaddr import IPAddress, ip_key


@attrs.frozen(order=True)
class Placement:
    """Where an IP is plumbed: the Topology longest-prefix match decides."""

    #: Ordered IPv4 before IPv6 (the two families do not compare).
    ip: IPAddress = attrs.field(order=ip_key)
    interface: str = attrs.field()
    #: 32 for IPv4 and 128 for IPv6 is a host address (the Topology default).
    prefixlen: int = attrs.field(default=32)


def place(ip: IPAddress, topology: Sequence[Topology]) -> Placement | None:
    """Longest-prefix match of ``ip`` against the Topology blocks (None: no block)."""
    best: Topology | None = None
    for t in topology:
        if ip in t.network and (best is None or t.network.prefixlen > best.network.prefixlen):
            best = t
    if best is None:
        return None
    return Placement(ip=ip, interface=best.interface, prefixlen=best.cidrmask)


#: Per-IP outcome of a batch: None for success, else a human-readable error.
Results = Mapping[IPAddress, str | None]

#: Interface name -> carrier (administratively up and the link running).
Carrier = Mapping[str, bool]


class Plumber(Protocol):
    """Adds and removes addresses on interfaces and announces them."""

    async def plumb(self, placements: Sequence[Placement]) -> Results:
        """Add every placement; an address already there (EEXIST) is success."""
        ...

    async def unplumb(self, placements: Sequence[Placement]) -> Results:
        """Remove every placement; an address already gone (EADDRNOTAVAIL) is success."""
        ...

    async def present(self, managed: Collection[IPAddress]) -> frozenset[IPAddress]:
        """Which of ``managed`` are on some interface now."""
        ...

    async def announce(self, placements: Sequence[Placement], *, all_hosts: bool) -> None:
        """Gratuitous ARP (IPv4) or unsolicited NA (IPv6) for the placements (all hosts, or unicast)."""
        ...

    async def watch_carrier(
        self,
        report: Callable[[Carrier], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Report every interface's carrier now, then after every link event, until cancelled.

        Event-driven (netlink ``RTMGRP_LINK``), never polled: the ``link``
        health check reacts to a carrier loss within one event.
        """
        ...

    async def aclose(self) -> None: ...
