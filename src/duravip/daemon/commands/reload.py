"""``config reload``: apply the config file again (answers once every service runs)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from attrs import frozen

from duravip.control.protocol import CommandError, CommandRegistry, Reply
from duravip.daemon.commands.common import Spec, add

RELOAD = Spec("config reload", "config reload", "re-read the config file and apply it without restart")
SPECS = (RELOAD,)


@frozen
class ReloadContext:
    #: Apply the config file again; returns the errors (empty: applied).
    reload: Callable[[], Awaitable[list[str]]]
    path: Callable[[], Path]


def register(registry: CommandRegistry, ctx: ReloadContext) -> None:
    add(registry, RELOAD, reload, ctx)


async def reload(ctx: ReloadContext, args: list[str]) -> Reply:
    errors = await ctx.reload()
    if errors:
        raise CommandError("config rejected, old config still running:\n" + "\n".join(errors))
    return Reply(text=f"config reloaded from {ctx.path()}", data={"reloaded": True})
