"""``cluster membership`` and ``cluster info``: who is in the cluster, and this node."""

from __future__ import annotations

import time
from typing import Any

import attrs
import trio
from attrs import frozen
from trio_util import AsyncValue

from duravip.control.protocol import CommandRegistry, Reply
from duravip.control.render import format_duration, table
from duravip.daemon.commands.common import Spec, add
from duravip.daemon.services import NodeState
from duravip.ipaddr import ip_key
from duravip.swim.driver import Membership

MEMBERSHIP = Spec("cluster membership", "cluster membership", "members with state, incarnation and view")
INFO = Spec("cluster info", "cluster info", "this node, its cluster and timers")
SPECS = (MEMBERSHIP, INFO)


@frozen
class ClusterContext:
    state: NodeState
    #: SWIM's own snapshot (addresses, incarnations, state ages).
    members: AsyncValue[Membership]


def register(registry: CommandRegistry, ctx: ClusterContext) -> None:
    add(registry, MEMBERSHIP, membership, ctx)
    add(registry, INFO, info, ctx)


async def membership(ctx: ClusterContext, args: list[str]) -> Reply:
    snap = ctx.members.value
    views = ctx.state.snapshot.value.views
    local = ctx.state.name
    now = time.time()
    rows = []
    data = []
    for name in sorted(snap.members):
        m = snap.members[name]
        v = views.get(name)
        item = {
            "name": name,
            "addr": str(m.addr) if not isinstance(m.addr, tuple) else f"{m.addr[0]}:{m.addr[1]}",
            "state": m.state,
            "incarnation": m.incarnation,
            "view_version": v.version if v else None,
            "mature": v.mature if v else None,
            #: Why a node is out of the elections (drained, unhealthy), else None.
            "status": (v.status or None) if v else None,
            "held": len(v.held) if v else None,
            "local": name == local,
        }
        data.append(item)
        rows.append(
            [
                name + (" *" if name == local else ""),
                item["addr"],
                m.state,
                str(m.incarnation),
                "-" if v is None else str(v.version),
                "-" if v is None else ("yes" if v.mature else f"no ({v.status})" if v.status else "no"),
                "-" if v is None else str(len(v.held)),
                format_duration(max(0.0, _age(m.state_since, now))),
            ]
        )
    text = table(["NODE", "ADDRESS", "STATE", "INC", "VIEW", "MATURE", "HELD", "FOR"], rows)
    return Reply(text=text, data={"members": data})


async def info(ctx: ClusterContext, args: list[str]) -> Reply:
    st = ctx.state
    c = st.config
    by_state: dict[str, int] = {}
    for s in st.snapshot.value.states.values():
        by_state[s] = by_state.get(s, 0) + 1
    held = sorted(st.held, key=ip_key)
    data: dict[str, Any] = {
        "node": st.name,
        "cluster": c.cluster.name,
        "profile": c.cluster.profile,
        "quorum": c.cluster.quorum,
        "gossip_address": str(c.cluster.gossip_address),
        "config": str(st.path),
        "uptime_s": round(time.time() - st.started_at, 3),
        "config_stable_s": round(st.config_stable_for(), 3),
        "view_stable_s": round(st.view_stable_for(), 3),
        "members": by_state,
        "duravips_configured": len(c.duravips),
        "held": [str(ip) for ip in held],
        "timers": attrs.asdict(c.cluster.timers),
    }
    lines = [
        f"node {st.name} in cluster {c.cluster.name!r} (profile {c.cluster.profile}, quorum {c.cluster.quorum})",
        f"gossip {c.cluster.gossip_address}, config {st.path}",
        f"up {format_duration(data['uptime_s'])}, config stable {format_duration(data['config_stable_s'])}, views stable {format_duration(data['view_stable_s'])}",
        "members: " + ", ".join(f"{k} {v}" for k, v in sorted(by_state.items())),
        f"DuraVIPs configured {len(c.duravips)}, held here {len(held)}",
    ]
    return Reply(text="\n".join(lines), data=data)


def _age(since: float, now: float) -> float:
    """Member state timestamps come from trio's clock; show an age either way."""
    try:
        return trio.current_time() - since
    except RuntimeError:
        return now - since
