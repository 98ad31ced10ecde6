"""Break-before-make handover planning (sans-IO).

Given the decisions and what every node says it holds, decide what this node
acquires and releases now. A live node (alive or suspect) that still holds an
IP blocks its new owner until it announces the release; a dead or left holder
does not (take over at once). Two live holders after a partition heals: the
non-owner releases, the owner keeps it.
"""

from __future__ import annotations

from collections.abc import Mapping

from attrs import Factory, frozen

from duravip.election.quorum import LIVE_STATES
from duravip.election.rule import Decision
from duravip.election.view import NodeView
from duravip.ipaddr import IPAddress

__all__ = ["Plan", "plan"]


@frozen
class Plan:
    acquire: frozenset[IPAddress]
    release: frozenset[IPAddress]
    #: Owned here but still held by a live node: IP -> that holder.
    waiting: Mapping[IPAddress, str] = Factory(dict)
    #: Acquired from a dead or left holder: IP -> that holder (a failover).
    from_dead: Mapping[IPAddress, str] = Factory(dict)


def plan(
    *,
    local: str,
    decisions: Mapping[IPAddress, Decision],
    held: frozenset[IPAddress],
    views: Mapping[str, NodeView],
    states: Mapping[str, str],
) -> Plan:
    """What ``local`` must do now (``held``: what it really holds)."""
    should = frozenset(ip for ip, d in decisions.items() if d.owner == local)
    release = held - should
    want = should - held
    waiting: dict[IPAddress, str] = {}
    from_dead: dict[IPAddress, str] = {}
    if want:
        for node in sorted(views):
            if node == local:
                continue
            both = want & views[node].held
            if not both:
                continue
            live = states.get(node) in LIVE_STATES
            for ip in both:
                if live:
                    waiting.setdefault(ip, node)
                else:
                    from_dead.setdefault(ip, node)
    acquire = want - waiting.keys()
    return Plan(
        acquire=acquire,
        release=release,
        waiting=waiting,
        from_dead={ip: n for ip, n in from_dead.items() if ip in acquire},
    )
