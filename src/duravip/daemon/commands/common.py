"""What the command groups share: their registration, the start-up placeholder, parsing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from ipaddress import ip_address
from typing import TypeVar

from attrs import frozen

from duravip.control.protocol import CommandError, CommandRegistry, Reply
from duravip.ipaddr import IPAddress

Handler = Callable[[list[str]], Awaitable[Reply]]
Ctx = TypeVar("Ctx")

#: What a command of a group that needs running services answers during start-up.
NOT_STARTED = "the resolver has not started yet (node still joining)"


@frozen
class Spec:
    """A command's words, usage line and one-line help (a console contract)."""

    name: str
    usage: str
    help: str


def add(
    registry: CommandRegistry,
    spec: Spec,
    handler: Callable[[Ctx, list[str]], Awaitable[Reply]],
    ctx: Ctx,
) -> None:
    """Register ``handler(ctx, args)`` under ``spec``."""
    registry.add(spec.name, partial(handler, ctx), help=spec.help, usage=spec.usage)


class Pending:
    """Placeholders for commands whose services are not running yet.

    The control socket comes up first so an operator can look while the rest
    starts; ``help`` lists every command from then on, and a command that
    needs a service answers :data:`NOT_STARTED` until :meth:`release` (which
    the node calls just before registering the real handlers).
    """

    def __init__(self, registry: CommandRegistry, specs: Iterable[Spec]) -> None:
        self.registry = registry
        self.specs = tuple(specs)
        for spec in self.specs:
            registry.add(spec.name, _not_started, help=spec.help, usage=spec.usage)

    def release(self) -> None:
        unregister(self.registry, self.specs)


def unregister(registry: CommandRegistry, specs: Iterable[Spec]) -> None:
    """Remove a group's commands (to register it again with a fuller context)."""
    for spec in specs:
        registry.remove(spec.name)


async def _not_started(args: list[str]) -> Reply:
    raise CommandError(NOT_STARTED)


def parse_ip(word: str) -> IPAddress:
    try:
        return ip_address(word)
    except ValueError:
        raise CommandError(f"not an IP address: {word!r}") from None
