"""Preemption control, sans-IO: a returning candidate may leave an IP with its holder.

The rule (:mod:`.rule`) always names the best candidate; with ``preempt =
false`` (keepalived's ``nopreempt``) or during ``preempt_delay`` that
candidate announces the IP in its view's ``yields``. This pass, applied to
the rule's decisions on every node alike, keeps such an IP with a live
candidate that holds it now. Everyone sees the same views, so everyone keeps
the same holder; an admin ``move`` override always wins, and a holder that
leaves, drains or fails a health check is no candidate, so the IP moves.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from ipaddress import IPv4Address

import attrs

from duravip.election.rule import Decision
from duravip.election.view import NodeView

__all__ = ["apply_preemption"]


def apply_preemption(
    decisions: Mapping[IPv4Address, Decision],
    views: Mapping[str, NodeView],
    alive: Collection[str],
) -> Mapping[IPv4Address, Decision]:
    """``decisions`` with every yielded IP left on its current live holder.

    Returns ``decisions`` itself when nothing changes (the common case costs
    one pass over the alive views).
    """
    out: dict[IPv4Address, Decision] | None = None
    for name in sorted(alive):
        view = views.get(name)
        if view is None or not view.yields or view.node != name:
            continue
        for ip in sorted(view.yields):
            d = decisions.get(ip)
            if d is None or d.owner != name or d.override is not None or d.follows is not None:
                continue
            holders = [
                h for h in d.candidates if h != name and h in views and ip in views[h].held
            ]
            if not holders:
                continue
            holder = holders[0]
            at = view.failback_at or None
            when = "after its preempt_delay" if at else "not before a move or the holder leaving"
            reason = f"stays with holder {holder}: {name} does not preempt ({when}); rule: {d.reason}"
            if out is None:
                out = dict(decisions)
            out[ip] = attrs.evolve(d, owner=holder, reason=reason, failback=name, failback_at=at)
    if out is None:
        return decisions
    # A Duravip_Follow IP goes with its binding's IP, wherever that stayed.
    for ip, d in decisions.items():
        if d.follows is None or d.override is not None:
            continue
        target = out.get(d.follows)
        if target is None or target.failback is None or target.owner == d.owner:
            continue
        if target.owner in d.candidates:
            out[ip] = attrs.evolve(
                d,
                owner=target.owner,
                reason=f"follows binding at {d.follows}, which {target.reason}",
                failback=target.failback,
                failback_at=target.failback_at,
            )
    return out
