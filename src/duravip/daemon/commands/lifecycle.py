"""``metrics`` and ``shutdown``: answered from the moment the control socket is up."""

from __future__ import annotations

import trio
from attrs import frozen

from duravip.control.protocol import CommandRegistry, Reply
from duravip.daemon.commands.common import Spec, add
from duravip.metrics import Registry

METRICS = Spec("metrics", "metrics", "all metrics in Prometheus text format")
SHUTDOWN = Spec("shutdown", "shutdown", "graceful stop: release IPs, hand queues over, leave")
SPECS = (METRICS, SHUTDOWN)


@frozen
class LifecycleContext:
    registry: Registry
    #: Set to ask for a graceful stop (the node acts on it once fully started).
    shutdown_requested: trio.Event


def register(registry: CommandRegistry, ctx: LifecycleContext) -> None:
    add(registry, METRICS, metrics, ctx)
    add(registry, SHUTDOWN, shutdown, ctx)


async def metrics(ctx: LifecycleContext, args: list[str]) -> Reply:
    text = ctx.registry.render()
    return Reply(text=text.rstrip("\n"), data={"prometheus": text})


async def shutdown(ctx: LifecycleContext, args: list[str]) -> Reply:
    ctx.shutdown_requested.set()
    return Reply(text="shutting down", data={"shutdown": True})
