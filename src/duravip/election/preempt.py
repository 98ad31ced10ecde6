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

import attrs

from duravip.election.rule import Decision
from duravip.election.view import NodeView
from duravip.ipaddr import IPAddress

__all__ = ["apply_preemption"]


def apply_preemption(
    decisions: Mapping[IPAddress, Decision],
    views: Mapping[str, NodeView],
    alive: Collection[str],
) -> Mapping[IPAddress, Decision]:
    """``decisions`` with every yielded IP left on its current live holder.

    Returns ``decisions`` itself when nothing changes (no node yields: one
    pass over the alive views). Rewritten decisions are shared between IPs
    that shared the rule's decision object (plain rendezvous IPs do), so
    10,240 yielded IPs cost a few thousand objects, not one each.
    """
    yielding = [
        (name, v) for name in sorted(alive) if (v := views.get(name)) is not None
        and v.yields and v.node == name
    ]
    if not yielding:
        return decisions
    #: IP -> the first (by name) alive node announcing it as held.
    held_by: dict[IPAddress, str] = {}
    for member in sorted(alive, reverse=True):
        v = views.get(member)
        if v is not None and v.node == member:
            held_by.update(dict.fromkeys(v.held, member))
    out: dict[IPAddress, Decision] | None = None
    made: dict[tuple[int, str], Decision] = {}
    by_node = dict(yielding)
    for ip, d in decisions.items():  # one pass: IPAddress hashing is the cost here
        name = d.owner
        if name is None or name not in by_node or d.override is not None or d.follows is not None:
            continue
        view = by_node[name]
        if ip not in view.yields:
            continue
        holder = held_by.get(ip)
        if holder is None or holder == name:
            continue
        if holder not in d.candidates:
            # The first holder is no candidate: any other holder that is one?
            others = [
                h for h in d.candidates
                if h != name and (hv := views.get(h)) is not None and ip in hv.held
            ]
            if not others:
                continue
            holder = others[0]
        key = (id(d), holder)
        nd = made.get(key)
        if nd is None:
            at = view.failback_at or None
            when = "after its preempt_delay" if at else "not before a move or the holder leaving"
            reason = f"stays with holder {holder}: {name} does not preempt ({when}); rule: {d.reason}"
            nd = made[key] = attrs.evolve(
                d, owner=holder, reason=reason, failback=name, failback_at=at
            )
        if out is None:
            out = dict(decisions)
        out[ip] = nd
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
