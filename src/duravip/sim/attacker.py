"""A keyless attacker on the simulated LAN: it captures sealed datagrams and replays them."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from attrs import define, field

from duravip.swim.members import Addr

#: Captured datagrams an attacker keeps (the most recent ones).
ATTACKER_STOCK = 64


@define
class Attacker:
    """A host on the LAN without the key: it records every sealed datagram it sees
    (as it reaches its destination) and re-sends captured ones every ``interval``
    seconds, once from its own address and once with the original sender's address
    forged as the source.

    It has its own RNG and its packets are never lost or delayed by the network's
    RNG, so the same seed gives the same run with or without it, except for what
    the replays themselves cause.
    """

    addr: Addr
    interval: float
    burst: int
    rng: random.Random
    #: (datagram, destination, original source)
    captured: list[tuple[bytes, Addr, Addr]] = field(factory=list)
    #: the first datagram seen towards each address (typically a ping), kept for good
    first: dict[Addr, tuple[bytes, Addr]] = field(factory=dict)
    sent: int = 0
    stop_at: float = math.inf

    def capture(self, data: bytes, dst: Addr, src: Addr) -> None:
        """Datagram ``data`` from ``src`` reached ``dst`` (our own replays excepted)."""
        if src != self.addr and (data, dst, src) not in self.captured:
            self.first.setdefault(dst, (data, src))
            self.captured.append((data, dst, src))
            if len(self.captured) > ATTACKER_STOCK:
                del self.captured[0]

    def volley(self, targets: Sequence[Addr]) -> list[tuple[bytes, Addr, Addr]]:
        """One round of replays as (datagram, destination, claimed source): the first
        datagram seen towards each node plus the ``burst`` most recent ones, each to its
        own destination and to one of ``targets``, from us and from its real sender."""
        out: list[tuple[bytes, Addr, Addr]] = []
        if not self.captured:
            return out
        first = [(d, a, src) for a, (d, src) in self.first.items()]
        for data, dst, src in [*first, *self.captured[-self.burst :]]:
            dests = [dst]
            if targets:
                dests.append(self.rng.choice(targets))
            for a in dests:
                for source in (self.addr, src):
                    out.append((data, a, source))
        return out
