"""The latency budget of a takeover: one structured log line per IP taken from a dead node.

Why a line per takeover: the milliseconds of a failover are spread over three
services (SWIM detects, the resolver decides, plumbing and listeners act), and
only a timeline with every stage says where they go. Every stamp is wall-clock
``time.time()`` (CLOCK_REALTIME): the nodes of a lab share one host, so the
stamps of the victim, the survivors and the client prober compare directly;
across hosts they compare only as well as the clocks are synchronised.

Stages, in the order they happen (``scripts/bench-failover --breakdown`` prints
the median of each, see ``docs/membership.md``):

``last_ack``  our last probe of the victim that it answered
``suspect``   we suspected it (our own failed probe, or a peer's gossip)
``dead``      we declared it dead (suspicion timer out) or heard it from a peer
``decision``  the resolver acted on the new election (acquire starts)
``bound``     the IP's SMTP listeners accept (``IP_FREEBIND``: before the address)
``plumbed``   the address is on the interface
``garp``      the first gratuitous ARP round is sent
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from duravip.ipaddr import IPAddress

log = logging.getLogger("duravip.budget")

STAGES = ("last_ack", "suspect", "dead", "decision", "bound", "plumbed", "garp")


class TakeoverBudget:
    """Assembles the stamps each service keeps and logs them once per takeover."""

    def __init__(
        self,
        *,
        marks: Callable[[str], Mapping[str, float]],
        plumbed_at: Mapping[IPAddress, float],
        garp_at: Mapping[IPAddress, float],
        bound_at: Mapping[IPAddress, float],
    ) -> None:
        self._marks = marks
        self._plumbed = plumbed_at
        self._garp = garp_at
        self._bound = bound_at
        self.logged = 0

    def stamps(self, ip: IPAddress, victim: str, decided: float) -> dict[str, float | None]:
        m = self._marks(victim)
        dead = m.get("dead", m.get("left"))
        return {
            "last_ack": m.get("ack"),
            "suspect": m.get("suspect"),
            "dead": dead,
            "decision": decided,
            "bound": self._bound.get(ip),
            "plumbed": self._plumbed.get(ip),
            "garp": self._garp.get(ip),
        }

    def on_takeover(self, ip: IPAddress, victim: str, decided: float) -> None:
        """The resolver took ``ip`` from the dead or left ``victim`` (decided at ``decided``)."""
        st = self.stamps(ip, victim, decided)
        base = st["dead"] or decided
        spans = {f"{k}_ms": round((v - base) * 1000.0, 2) for k, v in st.items() if v is not None}
        self.logged += 1
        log.info(
            "takeover budget",
            extra={
                "fields": {
                    "ip": str(ip),
                    "victim": victim,
                    "logged_at": time.time(),
                    **{f"t_{k}": v for k, v in st.items()},
                    **spans,
                }
            },
        )
