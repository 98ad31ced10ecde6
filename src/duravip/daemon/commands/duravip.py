"""``cluster duravip ...`` and the two ``broadcast`` commands: owners, holders, steering.

Two registrations: the views (show, tables, explain) read only the node's
state and answer from the start (nothing is resolved before the resolver
runs); the steering commands (announce, move) need the resolver itself.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Protocol

from attrs import frozen

from duravip.config import DuraVip
from duravip.control.protocol import CommandError, CommandRegistry, Reply
from duravip.control.render import format_duration, table
from duravip.daemon.commands.common import Spec, add, parse_ip
from duravip.daemon.services import NodeState
from duravip.election import Decision, NodeView, VipClaim, score
from duravip.election.picture import holders_by_ip
from duravip.ipaddr import IPAddress, ip_key

SHOW = Spec("cluster duravip show", "cluster duravip show", "every DuraVIP: services, owner, holder, states")
TABLES = Spec("cluster duravip show tables", "cluster duravip show tables", "raw views and decisions as JSON")
EXPLAIN = Spec("cluster duravip explain", "cluster duravip explain IP", "candidates, scores and why this owner")
ANNOUNCE = Spec(
    "broadcast cluster duravip announce view",
    "broadcast cluster duravip announce view",
    "re-announce this node's view (run after config reload on every node)",
)
MOVE = Spec(
    "broadcast cluster duravip move",
    "broadcast cluster duravip move IP to NODE",
    "move a DuraVIP to a node (a temporary override the cluster agrees on)",
)
VIEW_SPECS = (SHOW, TABLES, EXPLAIN)
STEER_SPECS = (ANNOUNCE, MOVE)
SPECS = (*VIEW_SPECS, *STEER_SPECS)


class Steering(Protocol):
    """The two calls that change this node's view (the resolver's)."""

    def announce(self) -> None: ...

    def request_move(self, ip: IPAddress, node: str) -> None: ...


@frozen
class SteeringContext:
    state: NodeState
    resolver: Steering


def register_views(registry: CommandRegistry, state: NodeState) -> None:
    add(registry, SHOW, show, state)
    add(registry, TABLES, tables, state)
    add(registry, EXPLAIN, explain, state)


def register_steering(registry: CommandRegistry, ctx: SteeringContext) -> None:
    add(registry, ANNOUNCE, announce, ctx)
    add(registry, MOVE, move, ctx)


async def show(st: NodeState, args: list[str]) -> Reply:
    rows, data = _duravip_rows(st)
    stable = st.view_stable_for()
    cstable = st.config_stable_for()
    text = table(["IP", "SERVICES", "OWNER", "HOLDER", "STATE", "REASON"], rows)
    for n, why in _out_of_service(st).items():
        text += f"\nnode {n}: not a candidate ({why})"
    text += f"\nviews stable for {format_duration(stable)}, config stable for {format_duration(cstable)}"
    return Reply(
        text=text,
        data={"duravips": data, "view_stable_s": round(stable, 3), "config_stable_s": round(cstable, 3)},
    )


async def tables(st: NodeState, args: list[str]) -> Reply:
    snap = st.snapshot.value
    data = {
        "states": dict(snap.states),
        "views": {name: _view_json(v) for name, v in snap.views.items()},
        "decisions": {str(ip): _decision_json(d) for ip, d in st.decisions.items()},
    }
    return Reply(text=json.dumps(data, indent=2, sort_keys=True), data=data)


async def explain(st: NodeState, args: list[str]) -> Reply:
    if len(args) != 1:
        raise CommandError("usage: cluster duravip explain IP")
    ip = parse_ip(args[0])
    d = st.decisions.get(ip)
    if d is None:
        raise CommandError(f"{ip} is not a DuraVIP any alive node announces")
    snap = st.snapshot.value
    announcing = sorted(n for n, v in snap.views.items() if ip in v.vips)
    cands = []
    for n in announcing:
        v = snap.views[n]
        claim = v.vips[ip]
        cands.append(
            {
                "node": n,
                "state": snap.states.get(n, "unknown"),
                "mature": v.mature,
                "status": v.status or None,
                "candidate": n in d.candidates,
                "score": f"{score(ip, n):016x}",
                "preference": claim.preference,
                "binding": claim.binding,
                "listener_ports": list(claim.listener_ports),
                "follows": claim.follows,
                "holds": ip in v.held,
            }
        )
    rows = [
        [
            c["node"],
            c["state"],
            "yes" if c["mature"] else "no",
            "yes" if c["candidate"] else (f"no ({c['status']})" if c["status"] else "no"),
            c["score"],
            c["preference"] or "-",
            c["binding"] or "-",
            ",".join(map(str, c["listener_ports"])) or "-",
            "yes" if c["holds"] else "",
        ]
        for c in cands
    ]
    text = f"{ip}: owner {d.owner or '(none)'}; states {_states(d)}\nreason: {d.reason}\n"
    text += table(["NODE", "STATE", "MATURE", "CAND", "SCORE", "PREF", "BINDING", "PORTS", "HOLDS"], rows)
    return Reply(text=text, data={"ip": str(ip), "decision": _decision_json(d), "nodes": cands})


async def announce(ctx: SteeringContext, args: list[str]) -> Reply:
    ctx.resolver.announce()
    return Reply(text="view announced", data={"announced": True})


async def move(ctx: SteeringContext, args: list[str]) -> Reply:
    if len(args) != 3 or args[1].lower() != "to":
        raise CommandError("usage: broadcast cluster duravip move IP to NODE")
    ip = parse_ip(args[0])
    target = args[2]
    if ip not in ctx.state.decisions:
        raise CommandError(f"{ip} is not a DuraVIP any alive node announces")
    if target not in ctx.state.snapshot.value.states:
        raise CommandError(f"no such member: {target}")
    ctx.resolver.request_move(ip, target)
    return Reply(text=f"moving {ip} to {target}", data={"ip": str(ip), "to": target})


# ----------------------------------------------------------------- helpers


def _states(d: Decision) -> str:
    return ",".join(sorted(d.states)) or "OK"


def _services(st: NodeState, ip: IPAddress) -> str:
    vip: DuraVip | VipClaim | None = st.config.duravips.get(ip)
    if vip is None:
        for v in st.snapshot.value.views.values():
            claim = v.vips.get(ip)
            if claim is not None:
                vip = claim
                break
    if vip is None:
        return "-"
    parts = []
    if vip.binding:
        parts.append(f"binding {vip.binding}")
    if vip.listener_ports:
        parts.append("smtp " + ",".join(map(str, vip.listener_ports)))
    if vip.follows:
        parts.append(f"follows {vip.follows}")
    return "; ".join(parts) or "-"


def _out_of_service(st: NodeState) -> dict[str, str]:
    """Live nodes that announce themselves as no candidate, and why (drained, unhealthy)."""
    snap = st.snapshot.value
    return {
        n: v.status
        for n, v in sorted(snap.views.items())
        if v.status and str(snap.states.get(n, "alive")) in ("alive", "suspect")
    }


def _reason(d: Decision | None, ip: IPAddress, st: NodeState, out: dict[str, str]) -> str:
    if d is None:
        return "not resolved yet"
    views = st.snapshot.value.views
    notes = [f"{n} {why}" for n, why in out.items() if n in views and ip in views[n].vips]
    if d.failback is not None and d.failback_at:
        notes.append(f"fail-back to {d.failback} at {_clock(d.failback_at)}")
    return "; ".join([d.reason, *notes])


def _clock(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S UTC")


def _duravip_rows(st: NodeState) -> tuple[list[list[str]], list[dict[str, Any]]]:
    holders = holders_by_ip(st.snapshot.value)
    decisions = st.decisions
    ips = sorted(set(decisions) | set(st.config.duravips), key=ip_key)
    out = _out_of_service(st)
    rows, data = [], []
    for ip in ips:
        d = decisions.get(ip)
        h = sorted(holders.get(ip, []))
        states = _states(d) if d else "UNKNOWN"
        services = _services(st, ip)
        reason = _reason(d, ip, st, out)
        rows.append(
            [
                str(ip),
                services,
                (d.owner if d else None) or "-",
                ",".join(h) or "-",
                states,
                reason,
            ]
        )
        data.append(
            {
                "ip": str(ip),
                "services": services,
                "owner": d.owner if d else None,
                "holders": h,
                "states": sorted(d.states) if d else ["UNKNOWN"],
                "candidates": list(d.candidates) if d else [],
                "reason": reason if d else None,
                "failback": d.failback if d else None,
                "failback_at": d.failback_at if d else None,
            }
        )
    return rows, data


def _view_json(v: NodeView) -> dict[str, Any]:
    return {
        "node": v.node,
        "version": v.version,
        "mature": v.mature,
        "status": v.status,
        "yields": sorted(str(ip) for ip in v.yields),
        "failback_at": v.failback_at or None,
        "held": sorted(str(ip) for ip in v.held),
        "mmove_addr": str(v.mmove_addr) if v.mmove_addr else None,
        "vips": {
            str(ip): {
                "listener_ports": list(c.listener_ports),
                "binding": c.binding,
                "preference": c.preference,
                "follows": c.follows,
            }
            for ip, c in sorted(v.vips.items(), key=lambda kv: ip_key(kv[0]))
        },
    }


def _decision_json(d: Decision) -> dict[str, Any]:
    return {
        "owner": d.owner,
        "states": sorted(d.states),
        "candidates": list(d.candidates),
        "reason": d.reason,
        "failback": d.failback,
        "failback_at": d.failback_at,
    }
