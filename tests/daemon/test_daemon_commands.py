"""Console command groups: the contract of names and usages, and the start-up placeholders."""

from __future__ import annotations

import pytest
import trio

from duravip.control.protocol import CommandError, CommandRegistry
from duravip.daemon.commands import cluster, duravip, lifecycle, mail, reload
from duravip.daemon.commands.common import NOT_STARTED, Pending
from duravip.metrics import Registry

#: name -> usage, as documented in docs/console.md (a contract: never rename).
CONTRACT = {
    "cluster membership": "cluster membership",
    "cluster info": "cluster info",
    "cluster duravip show": "cluster duravip show",
    "cluster duravip show tables": "cluster duravip show tables",
    "cluster duravip explain": "cluster duravip explain IP",
    "broadcast cluster duravip announce view": "broadcast cluster duravip announce view",
    "broadcast cluster duravip move": "broadcast cluster duravip move IP to NODE",
    "mailq": "mailq",
    "config reload": "config reload",
    "metrics": "metrics",
    "shutdown": "shutdown",
}


def test_every_group_together_is_exactly_the_documented_command_set() -> None:
    specs = [*cluster.SPECS, *duravip.SPECS, *mail.SPECS, *reload.SPECS, *lifecycle.SPECS]
    assert {s.name: s.usage for s in specs} == CONTRACT
    assert len(specs) == len(CONTRACT)


async def test_late_commands_answer_not_started_until_released() -> None:
    registry = CommandRegistry()
    shutdown = trio.Event()
    lifecycle.register(registry, lifecycle.LifecycleContext(Registry(), shutdown))
    pending = Pending(registry, [*cluster.SPECS, *duravip.SPECS, *mail.SPECS, *reload.SPECS])
    # help lists every command from the start, with its usage and help text.
    names = {" ".join(c.words): c.usage for c in registry.commands.values()}
    assert {k: v for k, v in names.items() if k != "help"} == CONTRACT
    cmd, args = registry.match(["cluster", "duravip", "explain", "10.0.0.1"])
    assert args == ["10.0.0.1"]
    with pytest.raises(CommandError, match="node still joining"):
        await cmd.handler(args)
    # The lifecycle group works at once.
    cmd, args = registry.match(["shutdown"])
    reply = await cmd.handler(args)
    assert reply.data == {"shutdown": True} and shutdown.is_set()
    pending.release()
    with pytest.raises(CommandError, match="unknown command"):
        registry.match(["mailq"])
    assert NOT_STARTED == "the resolver has not started yet (node still joining)"
