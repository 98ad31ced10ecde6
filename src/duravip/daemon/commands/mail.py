"""``mailq``: queued messages per group/binding (answers once the mail service runs)."""

from __future__ import annotations

from collections.abc import Callable

from attrs import frozen

from duravip.control.protocol import CommandRegistry, Reply
from duravip.control.render import table
from duravip.daemon.commands.common import Spec, add
from duravip.mail.router import PENDING, MailqRow

MAILQ = Spec("mailq", "mailq", "queued messages per group/binding, #mmove included")
SPECS = (MAILQ,)


@frozen
class MailContext:
    mailq: Callable[[], list[MailqRow]]


def register(registry: CommandRegistry, ctx: MailContext) -> None:
    add(registry, MAILQ, mailq, ctx)


async def mailq(ctx: MailContext, args: list[str]) -> Reply:
    rows = ctx.mailq()
    data = [
        {"group": r.group, "binding": r.binding, "active": r.active, "delayed": r.delayed}
        for r in rows
    ]
    text = table(
        ["GROUP/BINDING", "ACTIVE", "DELAYED"],
        [[f"{r.group}/{r.binding}", str(r.active), str(r.delayed)] for r in rows],
    )
    # Two-phase mmove: copies moved here that await their sender's commit.
    pend = next((r for r in rows if r.binding == PENDING), None)
    count, age = (pend.active, round(pend.age, 1)) if pend is not None else (0, 0.0)
    if pend is not None:
        text += f"\npending moves: {count}, oldest {age:.1f}s"
    return Reply(text=text, data={"queues": data, "pending": {"count": count, "age": age}})
