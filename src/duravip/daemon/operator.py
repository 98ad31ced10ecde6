"""Operator control: drain state, health checks and notify hooks, wired to the resolver.

The node's eligibility is one string or None, composed here: ``drained``
(persisted in the spool directory, so it survives a restart until
``node undrain``) wins over the first failing health check. The resolver
announces an ineligible node as no candidate, exactly like a maturing one,
so its IPs move off break-before-make and its queues follow the holders
while it stays a member and keeps delivering what it has.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Collection, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import trio
from attrs import frozen

from duravip.config import Config, HostPort
from duravip.config.model import HealthCheck
from duravip.control.protocol import CommandRegistry
from duravip.daemon.commands import node as node_cmds
from duravip.daemon.notify import Notifier
from duravip.daemon.services import NodeState
from duravip.election.picture import handed_off
from duravip.election.resolver import ResolverService
from duravip.health.runner import HealthContext, HealthService
from duravip.health.runner import serve as serve_health
from duravip.ipaddr import IPAddress, ip_key
from duravip.mail.router import MMOVE
from duravip.mail.service import MailService
from duravip.plumbing.base import Plumber

__all__ = ["DRAIN_FILE", "Operator", "OperatorContext", "serve"]

log = logging.getLogger("duravip.operator")

#: In the spool directory: present while the node is drained.
DRAIN_FILE = "drained"


@frozen
class OperatorContext:
    state: NodeState
    resolver: ResolverService
    plumber: Plumber
    mail: MailService
    registry: CommandRegistry


def read_drain(spool: Path) -> float | None:
    """When the node was drained (wall time), None when it is not."""
    try:
        data = json.loads((spool / DRAIN_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return 0.0  # unreadable but present: stay drained (the safe side)
    since = data.get("since", 0.0) if isinstance(data, dict) else 0.0
    return float(since) if isinstance(since, (int, float)) else 0.0


def write_drain(spool: Path, since: float | None) -> None:
    """Persist (``since``) or clear (None) the drain mark durably."""
    path = spool / DRAIN_FILE
    if since is None:
        path.unlink(missing_ok=True)
    else:
        tmp = spool / (DRAIN_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps({"since": since}).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    dfd = os.open(spool, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Operator:
    """Drain, health and notify for one node (the console's and the metrics' handle)."""

    def __init__(self, ctx: OperatorContext, health: HealthService, notifier: Notifier) -> None:
        self.ctx = ctx
        self.health = health
        self.notifier = notifier
        self.drained_since = read_drain(self._spool())
        self._health_scope: trio.CancelScope | None = None
        self._healthy = True
        self.reason: str | None = None
        #: What this node held when drained: ``--wait`` waits for peers to hold it.
        self._drained_ips: frozenset[IPAddress] = frozenset()

    def _spool(self) -> Path:
        return self.ctx.state.config.spool.path

    @property
    def drained(self) -> bool:
        return self.drained_since is not None

    def update(self) -> None:
        """Recompute eligibility from drain and health; tell the resolver and the hooks."""
        now = trio.current_time()
        healthy = not self.health.failing(now)
        if healthy != self._healthy:
            self._healthy = healthy
            self.notifier.emit("healthy" if healthy else "unhealthy")
        reason = "drained" if self.drained else self.health.reason(now)
        if reason != self.reason:
            log.warning(
                "eligibility: %s", reason or "candidate", extra={"fields": {"reason": reason}}
            )
            self.reason = reason
        self.ctx.resolver.set_eligibility(reason)

    async def drain(self) -> None:
        self._drained_ips = frozenset(self.ctx.resolver.held.value) | self._drained_ips
        if not self.drained:
            since = time.time()
            await trio.to_thread.run_sync(write_drain, self._spool(), since)
            self.drained_since = since
            self.notifier.emit("drained")
        self.update()

    async def undrain(self) -> None:
        if self.drained:
            await trio.to_thread.run_sync(write_drain, self._spool(), None)
            self.drained_since = None
            self._drained_ips = frozenset()
            self.notifier.emit("undrained")
        self.update()

    def handed_off(self) -> tuple[int, int]:
        """(IPs held here or not yet by a peer, messages still waiting to move to a holder)."""
        moving = sum(r.active + r.delayed for r in self.ctx.mail.mailq() if r.binding == MMOVE)
        held = self.ctx.resolver.held.value
        if not held and handed_off(self.ctx.state.snapshot.value, self._drained_ips):
            return 0, moving
        return max(1, len(held)), moving

    def failback_pending(self) -> dict[str, float | None]:
        """IPs this node would own but leaves with their holder -> when it takes them back."""
        me = self.ctx.state.name
        decisions = self.ctx.resolver.decisions.value
        return {str(ip): d.failback_at for ip, d in sorted(decisions.items(), key=lambda kv: ip_key(kv[0])) if d.failback == me}

    def report(self) -> dict[str, Any]:
        now = trio.current_time()
        return {
            "node": self.ctx.state.name,
            "eligible": self.reason is None,
            "reason": self.reason,
            "drained": self.drained,
            "drained_since": self.drained_since,
            "health": self.health.report(now),
            "failback_pending": self.failback_pending(),
            "notify": dict(self.notifier.counters),
        }

    async def run_health(
        self,
        checks: Sequence[HealthCheck],
        hctx: HealthContext,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """One generation of the health checks, until a reload with other checks replaces it."""
        with trio.CancelScope() as scope:
            if self._health_scope is not None:
                self._health_scope.cancel()
            self._health_scope = scope
            async with trio.open_nursery() as nursery:
                self.health = await nursery.start(partial(serve_health, checks=checks, ctx=hctx))
                self.update()
                task_status.started()
                async for _ in self.health.changed.transitions():
                    self.update()


def smtp_targets(state: NodeState, held: Callable[[], Collection[Any]]) -> Sequence[HostPort]:
    """Our own SMTP listeners: on held DuraVIPs first, then the plain ones."""
    c = state.config
    out = [
        HostPort(ip, port) for ip in sorted(held(), key=ip_key) if ip in c.duravips
        for port in c.duravips[ip].listener_ports
    ]
    out += [ls.address for ls in c.listeners if not ls.is_duravip]
    return out


async def serve(
    ctx: OperatorContext, *, task_status: trio.TaskStatus[Operator] = trio.TASK_STATUS_IGNORED
) -> None:
    """Start the notifier and the health checks, apply a persisted drain, register ``node``."""
    st = ctx.state
    notifier = Notifier(
        node=st.name,
        program=lambda: st.config.cluster.notify,
        fifo=lambda: st.config.cluster.notify_fifo,
        timeout=lambda: st.config.cluster.notify_timeout,
    )
    hctx = HealthContext(
        smtp_targets=partial(smtp_targets, st, lambda: ctx.resolver.held.value),
        spool_path=lambda: st.config.spool.path,
        interfaces=lambda: {t.interface for t in st.config.cluster.topology},
        plumber=ctx.plumber,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(notifier.serve)
        ctx.resolver.on_held_change.append(lambda event, ip: notifier.emit(event, str(ip)))
        op = Operator(ctx, HealthService(()), notifier)
        if op.drained:
            log.warning("node is drained (since %s): taking no IPs until undrained", op.drained_since)
        await nursery.start(op.run_health, st.config.health, hctx)

        def reloaded(config: Config) -> None:
            if config.health != tuple(op.health.checks.values()):
                log.info("health checks changed on reload: restarting them")
                nursery.start_soon(op.run_health, config.health, hctx)

        ctx.resolver.on_config.append(reloaded)
        node_cmds.register(ctx.registry, op)
        task_status.started(op)

