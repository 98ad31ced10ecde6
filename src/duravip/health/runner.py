"""The health service (Trio): one task per configured check, one verdict for the node.

Each periodic check (``smtp``, ``spool``, ``script``) probes every
``interval`` and feeds its :class:`~duravip.health.state.Hysteresis`; the
``link`` check follows the plumber's carrier events instead (a loss counts
at once, a carrier must stay up ``rise * interval`` to count as back). The
node reads :meth:`HealthService.reason` whenever :attr:`HealthService.changed`
moves and turns it into eligibility.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio
from trio_util import AsyncValue

from duravip.config.model import HealthCheck, HostPort
from duravip.health.probes import probe_script, probe_smtp, probe_spool
from duravip.health.state import Hysteresis
from duravip.plumbing.base import Carrier, Plumber

__all__ = ["HealthContext", "HealthService", "serve"]

log = logging.getLogger("duravip.health")


@attrs.frozen
class HealthContext:
    """What the checks look at (read at every probe, so a reload is seen)."""

    #: Our own SMTP listeners worth a banner check, held DuraVIPs first.
    smtp_targets: Callable[[], Sequence[HostPort]]
    spool_path: Callable[[], Path]
    #: The Topology interfaces the ``link`` check watches.
    interfaces: Callable[[], Collection[str]]
    plumber: Plumber


class HealthService:
    """The checks' states; ``changed`` bumps whenever a check's verdict changes."""

    def __init__(self, checks: Sequence[HealthCheck]) -> None:
        self.checks = {c.name: c for c in checks}
        self.states = {
            c.name: Hysteresis(
                rise=c.rise, fall=c.fall, flap_limit=c.flap_limit, hold_down=c.hold_down
            )
            for c in checks
        }
        self.changed = AsyncValue(0)
        #: Bumped on every probe result (a hold-down may start without a change).
        self._probed = AsyncValue(0)

    def failing(self, now: float) -> list[str]:
        return [n for n, s in self.states.items() if not s.healthy(now)]

    def reason(self, now: float) -> str | None:
        """``unhealthy: smtp (detail)`` for the first failing check, None when all pass."""
        for name, st in self.states.items():
            if not st.healthy(now):
                return f"{st.status(now)}: {name} ({st.detail})" if st.detail else f"{st.status(now)}: {name}"
        return None

    def report(self, now: float) -> list[dict[str, Any]]:
        """One row per check for the console and ``--json``."""
        return [
            {
                "check": name,
                "type": self.checks[name].kind,
                "status": st.status(now),
                "healthy": st.healthy(now),
                "detail": st.detail,
                "ok_run": st.ok_run,
                "fail_run": st.fail_run,
                "probes": st.probes,
                "failures": st.failures,
                "transitions": st.transitions,
                "hold_downs": st.hold_downs,
                "hold_down_left_s": round(max(0.0, st.held_until - now), 3),
            }
            for name, st in self.states.items()
        ]

    def counters(self) -> Mapping[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for name, st in self.states.items():
            for k in ("probes", "failures", "transitions", "hold_downs"):
                out[(name, k)] = getattr(st, k)
        return out

    def _observe(self, name: str, ok: bool, detail: str) -> None:
        st = self.states[name]
        self._probed.value += 1
        if st.observe(trio.current_time(), ok, detail):
            now = trio.current_time()
            log.warning(
                "health check %s is now %s: %s", name, st.status(now), detail,
                extra={"fields": {"check": name, "status": st.status(now)}},
            )
            self.changed.value += 1

    async def _hold_down_watch(self, name: str) -> None:
        """Wake when a hold-down ends (the verdict changes without a probe)."""
        st = self.states[name]
        while True:
            before = trio.current_time()
            end = st.deadline(before)
            if math.isinf(end):
                await self._probed.wait_transition()
                continue
            await trio.sleep_until(end)
            if st.tick(before, trio.current_time()):
                self.changed.value += 1

    async def _run_periodic(self, check: HealthCheck, ctx: HealthContext) -> None:
        while True:
            started = trio.current_time()
            if check.kind == "smtp":
                ok, detail = await probe_smtp(ctx.smtp_targets(), check.timeout)
            elif check.kind == "spool":
                ok, detail = await probe_spool(ctx.spool_path(), check.min_free, check.timeout)
            else:
                assert check.path is not None
                ok, detail = await probe_script(check.path, check.timeout)
            self._observe(check.name, ok, detail)
            await trio.sleep_until(started + check.interval)

    async def _run_link(self, check: HealthCheck, ctx: HealthContext) -> None:
        """Carrier events: a loss fails the check at once, a return after ``rise * interval``."""
        send, recv = trio.open_memory_channel[Carrier](math.inf)
        settle = check.rise * check.interval
        async with trio.open_nursery() as nursery:
            await nursery.start(ctx.plumber.watch_carrier, send.send_nowait)
            carrier: Carrier = {}
            up_since: float | None = None
            while True:
                wake = math.inf if up_since is None else up_since + settle
                with trio.move_on_at(wake):
                    carrier = await recv.receive()
                now = trio.current_time()
                down = sorted(i for i in ctx.interfaces() if not carrier.get(i, False))
                st = self.states[check.name]
                if not down and st.probes == 0:
                    self._observe(check.name, True, "carrier on every interface")
                elif down:
                    up_since = None
                    # fall consecutive failures at once: carrier loss is not noisy.
                    for _ in range(check.fall if st.passing else 1):
                        self._observe(check.name, False, "no carrier on " + ", ".join(down))
                elif not st.passing or st.detail.startswith("no carrier"):
                    if up_since is None:
                        up_since = now
                    elif now >= up_since + settle:
                        up_since = None
                        for _ in range(check.rise):
                            self._observe(check.name, True, "carrier on every interface")


async def serve(
    *,
    checks: Sequence[HealthCheck],
    ctx: HealthContext,
    task_status: trio.TaskStatus[HealthService] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run every check until cancelled (nothing to run: only the service handle)."""
    svc = HealthService(checks)
    async with trio.open_nursery() as nursery:
        for check in checks:
            run = svc._run_link if check.kind == "link" else svc._run_periodic
            nursery.start_soon(run, check, ctx)
            nursery.start_soon(svc._hold_down_watch, check.name)
        task_status.started(svc)
        await trio.sleep_forever()
