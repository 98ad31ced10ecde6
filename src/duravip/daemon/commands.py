"""Console commands of a running node: what ``duravip console`` can ask and steer.

Each handler returns a :class:`Reply` with a human table (``text``) and the
same facts as JSON (``data``), so ``--json`` never needs a second code path.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from ipaddress import AddressValueError, IPv4Address
from typing import TYPE_CHECKING, Any

from duravip.control.protocol import CommandError, CommandRegistry, Reply
from duravip.control.render import format_duration, table

if TYPE_CHECKING:
    from duravip.daemon.node import Node

Handler = Callable[[list[str]], Awaitable[Reply]]


def _ip(word: str) -> IPv4Address:
    try:
        return IPv4Address(word)
    except (AddressValueError, ValueError):
        raise CommandError(f"not an IPv4 address: {word!r}") from None


def register(registry: CommandRegistry, node: Node) -> None:
    def add(name: str, usage: str, help_text: str) -> Callable[[Handler], Handler]:
        def deco(fn: Handler) -> Handler:
            registry.add(name, fn, help=help_text, usage=usage)
            return fn

        return deco

    @add("cluster membership", "cluster membership", "members with state, incarnation and view")
    async def membership(args: list[str]) -> Reply:
        snap = node.membership.snapshot.value
        views = node.snapshot.value.views
        now = time.time()
        rows = []
        data = []
        for name in sorted(snap.members):
            m = snap.members[name]
            v = views.get(name)
            since = getattr(m, "state_since", None)
            item = {
                "name": name,
                "addr": str(m.addr) if not isinstance(m.addr, tuple) else f"{m.addr[0]}:{m.addr[1]}",
                "state": m.state,
                "incarnation": m.incarnation,
                "view_version": v.version if v else None,
                "mature": v.mature if v else None,
                "held": len(v.held) if v else None,
                "local": name == node.name,
            }
            data.append(item)
            rows.append(
                [
                    name + (" *" if name == node.name else ""),
                    item["addr"],
                    m.state,
                    str(m.incarnation),
                    "-" if v is None else str(v.version),
                    "-" if v is None else ("yes" if v.mature else "no"),
                    "-" if v is None else str(len(v.held)),
                    "-" if since is None else format_duration(max(0.0, _wall(since, now))),
                ]
            )
        text = table(["NODE", "ADDRESS", "STATE", "INC", "VIEW", "MATURE", "HELD", "FOR"], rows)
        return Reply(text=text, data={"members": data})

    @add("cluster info", "cluster info", "this node, its cluster and timers")
    async def info(args: list[str]) -> Reply:
        c = node.config
        snap = node.snapshot.value
        by_state: dict[str, int] = {}
        for s in snap.states.values():
            by_state[s] = by_state.get(s, 0) + 1
        held = sorted(node.resolver.held.value) if node.resolver else []
        data: dict[str, Any] = {
            "node": node.name,
            "cluster": c.cluster.name,
            "profile": c.cluster.profile,
            "quorum": c.cluster.quorum,
            "gossip_address": str(c.cluster.gossip_address),
            "config": str(node.path),
            "uptime_s": round(time.time() - node.started_at, 3),
            "config_stable_s": round(time.time() - node.config_loaded_at, 3),
            "view_stable_s": round(view_stable_for(node), 3),
            "members": by_state,
            "duravips_configured": len(c.duravips),
            "held": [str(ip) for ip in held],
            "timers": _timers(node),
        }
        lines = [
            f"node {node.name} in cluster {c.cluster.name!r} (profile {c.cluster.profile}, quorum {c.cluster.quorum})",
            f"gossip {c.cluster.gossip_address}, config {node.path}",
            f"up {format_duration(data['uptime_s'])}, config stable {format_duration(data['config_stable_s'])}, views stable {format_duration(data['view_stable_s'])}",
            "members: " + ", ".join(f"{k} {v}" for k, v in sorted(by_state.items())),
            f"DuraVIPs configured {len(c.duravips)}, held here {len(held)}",
        ]
        return Reply(text="\n".join(lines), data=data)

    @add("cluster duravip show", "cluster duravip show", "every DuraVIP: services, owner, holder, states")
    async def show(args: list[str]) -> Reply:
        rows, data = _duravip_rows(node)
        stable = view_stable_for(node)
        cstable = time.time() - node.config_loaded_at
        text = table(["IP", "SERVICES", "OWNER", "HOLDER", "STATE", "REASON"], rows)
        text += f"\nviews stable for {format_duration(stable)}, config stable for {format_duration(cstable)}"
        return Reply(
            text=text,
            data={"duravips": data, "view_stable_s": round(stable, 3), "config_stable_s": round(cstable, 3)},
        )

    @add("cluster duravip show tables", "cluster duravip show tables", "raw views and decisions as JSON")
    async def tables(args: list[str]) -> Reply:
        import json

        snap = node.snapshot.value
        data = {
            "states": dict(snap.states),
            "views": {name: _view_json(v) for name, v in snap.views.items()},
            "decisions": {str(ip): _decision_json(d) for ip, d in _decisions(node).items()},
        }
        return Reply(text=json.dumps(data, indent=2, sort_keys=True), data=data)

    @add("cluster duravip explain", "cluster duravip explain IP", "candidates, scores and why this owner")
    async def explain(args: list[str]) -> Reply:
        if len(args) != 1:
            raise CommandError("usage: cluster duravip explain IP")
        ip = _ip(args[0])
        d = _decisions(node).get(ip)
        if d is None:
            raise CommandError(f"{ip} is not a DuraVIP any alive node announces")
        from duravip.election import score

        snap = node.snapshot.value
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
                "yes" if c["candidate"] else "no",
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

    @add("broadcast cluster duravip announce view", "broadcast cluster duravip announce view",
         "re-announce this node's view (run after config reload on every node)")
    async def announce(args: list[str]) -> Reply:
        _resolver(node).announce()
        return Reply(text="view announced", data={"announced": True})

    @add("broadcast cluster duravip move", "broadcast cluster duravip move IP to NODE",
         "move a DuraVIP to a node (a temporary override the cluster agrees on)")
    async def move(args: list[str]) -> Reply:
        if len(args) != 3 or args[1].lower() != "to":
            raise CommandError("usage: broadcast cluster duravip move IP to NODE")
        ip = _ip(args[0])
        target = args[2]
        if ip not in _decisions(node):
            raise CommandError(f"{ip} is not a DuraVIP any alive node announces")
        if target not in node.snapshot.value.states:
            raise CommandError(f"no such member: {target}")
        _resolver(node).request_move(ip, target)
        return Reply(text=f"moving {ip} to {target}", data={"ip": str(ip), "to": target})

    @add("mailq", "mailq", "queued messages per group/binding, #mmove included")
    async def mailq(args: list[str]) -> Reply:
        rows = node.mail.mailq()
        data = [
            {"group": r.group, "binding": r.binding, "active": r.active, "delayed": r.delayed}
            for r in rows
        ]
        text = table(
            ["GROUP/BINDING", "ACTIVE", "DELAYED"],
            [[f"{r.group}/{r.binding}", str(r.active), str(r.delayed)] for r in rows],
        )
        return Reply(text=text, data={"queues": data})

    @add("config reload", "config reload", "re-read the config file and apply it without restart")
    async def reload(args: list[str]) -> Reply:
        errors = await node.reload()
        if errors:
            raise CommandError("config rejected, old config still running:\n" + "\n".join(errors))
        return Reply(text=f"config reloaded from {node.path}", data={"reloaded": True})

    @add("metrics", "metrics", "all metrics in Prometheus text format")
    async def metrics_cmd(args: list[str]) -> Reply:
        text = node.registry.render()
        return Reply(text=text.rstrip("\n"), data={"prometheus": text})

    @add("shutdown", "shutdown", "graceful stop: release IPs, hand queues over, leave")
    async def shutdown(args: list[str]) -> Reply:
        node.shutdown_requested.set()
        return Reply(text="shutting down", data={"shutdown": True})


# ----------------------------------------------------------------- helpers


def view_stable_for(node: Node) -> float:
    return max(0.0, time.monotonic() - node.views_changed_at)


def _wall(since: float, now: float) -> float:
    """Member state timestamps come from trio's clock; show an age either way."""
    import trio

    try:
        return trio.current_time() - since
    except RuntimeError:
        return now - since


def _timers(node: Node) -> dict[str, Any]:
    import attrs

    return attrs.asdict(node.config.cluster.timers)


def _resolver(node: Node) -> Any:
    if node.resolver is None:
        raise CommandError("the resolver has not started yet (node still joining)")
    return node.resolver


def _decisions(node: Node) -> Any:
    return node.resolver.decisions.value if node.resolver else {}


def _states(d: Any) -> str:
    return ",".join(sorted(d.states)) or "OK"


def _services(node: Node, ip: IPv4Address) -> str:
    vip = node.config.duravips.get(ip)
    if vip is None:
        for v in node.snapshot.value.views.values():
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


def _duravip_rows(node: Node) -> tuple[list[list[str]], list[dict[str, Any]]]:
    holders = node.holders_by_ip()
    decisions = _decisions(node)
    ips = sorted(set(decisions) | set(node.config.duravips))
    rows, data = [], []
    for ip in ips:
        d = decisions.get(ip)
        h = sorted(holders.get(ip, []))
        states = _states(d) if d else "UNKNOWN"
        rows.append(
            [
                str(ip),
                _services(node, ip),
                (d.owner if d else None) or "-",
                ",".join(h) or "-",
                states,
                d.reason if d else "not resolved yet",
            ]
        )
        data.append(
            {
                "ip": str(ip),
                "services": _services(node, ip),
                "owner": d.owner if d else None,
                "holders": h,
                "states": sorted(d.states) if d else ["UNKNOWN"],
                "candidates": list(d.candidates) if d else [],
                "reason": d.reason if d else None,
            }
        )
    return rows, data


def _view_json(v: Any) -> dict[str, Any]:
    return {
        "node": v.node,
        "version": v.version,
        "mature": v.mature,
        "held": sorted(str(ip) for ip in v.held),
        "mmove_addr": str(v.mmove_addr) if v.mmove_addr else None,
        "vips": {
            str(ip): {
                "listener_ports": list(c.listener_ports),
                "binding": c.binding,
                "preference": c.preference,
                "follows": c.follows,
            }
            for ip, c in sorted(v.vips.items())
        },
    }


def _decision_json(d: Any) -> dict[str, Any]:
    return {
        "owner": d.owner,
        "states": sorted(d.states),
        "candidates": list(d.candidates),
        "reason": d.reason,
    }
