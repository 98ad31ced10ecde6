"""``node drain [--wait]``, ``node undrain`` and ``node status``: this node's operator state.

A drained node stays a member and keeps delivering what it has but takes
no IPs; the mark is kept in the spool directory until ``node undrain``.
``--wait`` answers once every IP is gone from here and no queued message is
still waiting to move to a holder (bounded by :data:`DRAIN_WAIT`).
"""

from __future__ import annotations

import time
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any, Protocol

import trio

from duravip.control.protocol import CommandError, CommandRegistry, Reply
from duravip.control.render import table
from duravip.daemon.commands.common import Spec, add

DRAIN = Spec(
    "node drain",
    "node drain [--wait]",
    "hand every IP and queue to the others; stay a member, take no IPs (kept over restarts)",
)
UNDRAIN = Spec("node undrain", "node undrain", "end a drain: this node is a candidate again")
STATUS = Spec("node status", "node status", "eligibility, drain, health checks, pending fail-backs, notify")
SPECS = (DRAIN, UNDRAIN, STATUS)

#: Longest ``node drain --wait`` (below the console's default 60 s timeout).
DRAIN_WAIT = 50.0


class NodeControl(Protocol):
    """What these commands need of the operator (``daemon/operator.Operator``)."""

    async def drain(self) -> None: ...

    async def undrain(self) -> None: ...

    def handed_off(self) -> tuple[int, int]: ...

    def report(self) -> dict[str, Any]: ...


def register(registry: CommandRegistry, ctx: NodeControl) -> None:
    for spec in SPECS:  # the start-up placeholders (common.Pending), if any
        with suppress(KeyError):
            registry.remove(spec.name)
    add(registry, DRAIN, drain, ctx)
    add(registry, UNDRAIN, undrain, ctx)
    add(registry, STATUS, status, ctx)


async def drain(ctx: NodeControl, args: list[str]) -> Reply:
    if args not in ([], ["--wait"]):
        raise CommandError("usage: node drain [--wait]")
    started = time.monotonic()
    await ctx.drain()
    held, moving = ctx.handed_off()
    if args == ["--wait"]:
        with trio.move_on_after(DRAIN_WAIT):
            while (held, moving) != (0, 0):
                await trio.sleep(0.1)  # mailq() walks the spool: not too often
                held, moving = ctx.handed_off()
    took = time.monotonic() - started
    done = (held, moving) == (0, 0)
    text = "drained" if done else f"draining: {held} IP(s) held, {moving} message(s) to move"
    if args == ["--wait"]:
        text += f" ({took:.2f}s)"
    return Reply(
        text=text,
        data={"drained": True, "done": done, "held": held, "to_move": moving, "seconds": round(took, 3)},
    )


async def undrain(ctx: NodeControl, args: list[str]) -> Reply:
    if args:
        raise CommandError("usage: node undrain")
    await ctx.undrain()
    return Reply(text="undrained: a candidate again", data={"drained": False})


def _when(t: float | None) -> str:
    if t is None:
        return "on move / holder leaving"
    return datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S UTC")


async def status(ctx: NodeControl, args: list[str]) -> Reply:
    r = ctx.report()
    lines = [
        f"node {r['node']}: {'candidate' if r['eligible'] else 'not a candidate: ' + str(r['reason'])}",
        f"drained: {'yes' if r['drained'] else 'no'}",
    ]
    if r["health"]:
        rows = [
            [h["check"], h["type"], h["status"], f"{h['ok_run']}/{h['fail_run']}", str(h["transitions"]), h["detail"]]
            for h in r["health"]
        ]
        lines.append(table(["CHECK", "TYPE", "STATUS", "OK/FAIL RUN", "CHANGES", "DETAIL"], rows))
    else:
        lines.append("no health checks configured")
    pending = r["failback_pending"]
    if pending:
        lines.append("pending fail-back (this node does not preempt the holder):")
        lines += [f"  {ip}: {_when(at)}" for ip, at in pending.items()]
    n = r["notify"]
    lines.append(
        f"notify: {n['events']} events, {n['ok']} ok, {n['failed']} failed, "
        f"{n['timeouts']} timed out, {n['dropped']} dropped"
    )
    return Reply(text="\n".join(lines), data=r)
