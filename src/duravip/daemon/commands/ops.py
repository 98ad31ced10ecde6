"""``mailq`` and ``config reload``: the running services' queues and configuration."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from attrs import frozen

from duravip.control.protocol import CommandError, CommandRegistry, Reply
from duravip.control.render import table
from duravip.daemon.commands.common import Spec, add
from duravip.mail.router import MailqRow

MAILQ = Spec("mailq", "mailq", "queued messages per group/binding, #mmove included")
RELOAD = Spec("config reload", "config reload", "re-read the config file and apply it without restart")
SPECS = (MAILQ, RELOAD)


@frozen
class OpsContext:
    mailq: Callable[[], list[MailqRow]]
    #: Apply the config file again; returns the errors (empty: applied).
    reload: Callable[[], Awaitable[list[str]]]
    path: Callable[[], Path]


def register(registry: CommandRegistry, ctx: OpsContext) -> None:
    add(registry, MAILQ, mailq, ctx)
    add(registry, RELOAD, reload, ctx)


async def mailq(ctx: OpsContext, args: list[str]) -> Reply:
    rows = ctx.mailq()
    data = [
        {"group": r.group, "binding": r.binding, "active": r.active, "delayed": r.delayed}
        for r in rows
    ]
    text = table(
        ["GROUP/BINDING", "ACTIVE", "DELAYED"],
        [[f"{r.group}/{r.binding}", str(r.active), str(r.delayed)] for r in rows],
    )
    return Reply(text=text, data={"queues": data})


async def reload(ctx: OpsContext, args: list[str]) -> Reply:
    errors = await ctx.reload()
    if errors:
        raise CommandError("config rejected, old config still running:\n" + "\n".join(errors))
    return Reply(text=f"config reloaded from {ctx.path()}", data={"reloaded": True})
