"""Binding assignment and routing: pure functions of the config and the holders map.

Two questions, kept apart on purpose:

* *assignment* (``requested_for``, ``resolve``): which binding a message
  leaves from. The rule's answer (binding, group or ``default``) is kept as
  ``requested`` so a rebind can re-resolve a group when its members move;
* *routing* (``route``): given the binding, deliver here, mmove to the node
  that holds it, or wait because nobody holds it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Literal

import xxhash
from attrs import frozen

from duravip.config.model import Config, Listener

DEFAULT = "default"
#: Virtual binding that holds messages waiting to be moved (mailq).
MMOVE = "#mmove"
#: Virtual binding of moved copies awaiting their sender's commit (two-phase mmove).
PENDING = "#pending"
#: Only this much of a message is parsed for the ``X-Binding`` header.
HEADER_SCAN_LIMIT = 64 * 1024


def listener_for(config: Config, local: tuple[str, int]) -> Listener | None:
    """The configured listener a connection arrived on (by address and port)."""
    host, port = local
    for lst in config.listeners:
        if str(lst.address.host) == host and lst.address.port == port:
            return lst
    return None


def _followed_binding(config: Config, listener: Listener) -> str | None:
    """``Duravip_Follow`` names a binding by name or by its IP."""
    target = listener.duravip_follow
    if target is None:
        return None
    b = config.binding(target)
    if b is not None:
        return b.name
    for b in config.bindings:
        if b.bind_address is not None and str(b.bind_address) == target:
            return b.name
    return None


def header_binding(data: bytes) -> str | None:
    """The value of the first ``X-Binding:`` header, if any (header section only).

    A hand-rolled scan (unfolding continuation lines): the ``email`` parser
    cost about 80 µs per message on the ingest path.
    """
    head = data[:HEADER_SCAN_LIMIT]
    if b"x-binding" not in head.lower():
        return None
    current: bytes | None = None
    for line in head.splitlines():
        if line[:1] in (b" ", b"\t") and current is not None:
            current += b" " + line.strip()
            continue
        if current is not None:
            found = _binding_value(current)
            if found is not None:
                return found
        if not line.strip():
            return None  # end of the header section
        current = line
    return None if current is None else _binding_value(current)


def _binding_value(header: bytes) -> str | None:
    name, colon, value = header.partition(b":")
    if not colon or name.strip().lower() != b"x-binding":
        return None
    return value.strip().decode("utf-8", "replace") or None


def known_target(config: Config, name: str) -> str | None:
    """Canonical spelling of a binding or group name, or ``None`` if unknown."""
    b = config.binding(name)
    if b is not None:
        return b.name
    for g in config.groups:
        if g.name.lower() == name.lower():
            return g.name
    return None


def requested_for(config: Config, local: tuple[str, int], data: bytes) -> str:
    """Apply the assignment rule: followed binding, else ``X-Binding``, else ``default``."""
    lst = listener_for(config, local)
    if lst is not None:
        followed = _followed_binding(config, lst)
        if followed is not None:
            return followed
    hdr = header_binding(data)
    if hdr is not None:
        target = known_target(config, hdr)
        if target is not None:
            return target
    return DEFAULT


def _score(key: str, binding: str) -> int:
    return xxhash.xxh64_intdigest(f"{key}\0{binding}".encode())


def resolve(
    config: Config,
    requested: str,
    *,
    held_here: Collection[str],
    key: str,
    available: Collection[str] | None = None,
) -> str:
    """Concrete binding for ``requested``.

    A group picks among the members this node holds; failing that, among the
    ``available`` ones (held by some node; ``None``: all), failing that, among
    all. Within that set, the highest stable hash of ``key`` (the message's
    mmove id) wins, so every node picks the same one.
    """
    if requested == DEFAULT:
        return DEFAULT
    b = config.binding(requested)
    if b is not None:
        return b.name
    for g in config.groups:
        if g.name.lower() == requested.lower():
            members = [m for m in g.bindings if config.binding(m) is not None]
            if not members:
                return DEFAULT
            local = [m for m in members if m in held_here]
            up = members if available is None else [m for m in members if m in available]
            pool = local or up or members
            return max(pool, key=lambda m: _score(key, m))
    return DEFAULT


def reassign(
    config: Config,
    *,
    requested: str,
    current: str,
    moved: Collection[str],
    held_here: Collection[str],
    key: str,
    unconditional: bool,
    available: Collection[str] | None = None,
) -> str:
    """Binding after a DuraVIP move: every message re-resolves when ``unconditional``,
    otherwise only those whose current binding moved (or no longer exists)."""
    if (
        unconditional
        or current in moved
        or (current != DEFAULT and config.binding(current) is None)
    ):
        return resolve(config, requested, held_here=held_here, key=key, available=available)
    return current


Route = tuple[Literal["local"], None] | tuple[Literal["move"], str] | tuple[Literal["wait"], None]


def route(binding: str, holders: Mapping[str, str | None], local: str) -> Route:
    """Where a message of ``binding`` goes now.

    ``default`` and bindings absent from ``holders`` (not DuraVIP: present on
    every node) are delivered here; a held binding goes to its holder; an
    unheld DuraVIP binding waits.
    """
    if binding == DEFAULT or binding not in holders:
        return ("local", None)
    node = holders[binding]
    if node is None:
        return ("wait", None)
    if node == local:
        return ("local", None)
    return ("move", node)


@frozen
class MailqRow:
    group: str
    binding: str
    active: int
    delayed: int
    #: Seconds since the oldest message of the row arrived (set for ``#pending``).
    age: float = 0.0


def group_of(config: Config, binding: str) -> str:
    b = config.binding(binding)
    if b is not None and b.group is not None:
        return b.group
    return DEFAULT
