"""The member table: states, incarnation rules and probe order.

Incarnation numbers order the claims made about a node: only the node itself
raises its incarnation (to refute a suspicion or announce new metadata), so a
claim with a lower incarnation is always stale, and an old packet replayed
later can never override a newer state.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterator
from enum import StrEnum
from typing import Literal, NamedTuple

from attrs import frozen

Addr = tuple[str, int]


class State(StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


EventKind = Literal[
    "joined", "alive", "updated", "suspect", "dead", "left", "meta-changed", "forgotten"
]


@frozen
class Member:
    """Public, immutable view of one member (what the election reads)."""

    name: str
    addr: Addr
    state: State
    incarnation: int
    #: The full metadata ("view") this node holds for the member.
    meta: bytes
    #: Version of ``meta`` above (the owner bumps it on every change).
    meta_version: int
    state_since: float
    #: False while a newer announced version is still being fetched.
    meta_current: bool = True


@frozen
class MemberEvent:
    kind: EventKind
    member: Member


class Tombstone(NamedTuple):
    """What is kept of a forgotten member: enough to refuse stale claims and to reconnect."""

    incarnation: int
    addr: Addr
    left: bool


class NodeState:
    """Mutable record of one member inside the core."""

    __slots__ = (
        "addr",
        "have_digest",
        "have_version",
        "incarnation",
        "meta",
        "meta_digest",
        "meta_len",
        "meta_version",
        "name",
        "state",
        "state_since",
    )

    def __init__(self, name: str, addr: Addr, incarnation: int, now: float) -> None:
        self.name = name
        self.addr = addr
        self.incarnation = incarnation
        self.state = State.ALIVE
        self.state_since = now
        # what the owner announces
        self.meta_version = 0
        self.meta_digest = 0
        self.meta_len = 0
        # the copy held here
        self.meta = b""
        self.have_version = -1
        self.have_digest = 0

    @property
    def meta_current(self) -> bool:
        return (self.have_version, self.have_digest) == (self.meta_version, self.meta_digest)

    def snapshot(self) -> Member:
        return Member(
            name=self.name,
            addr=self.addr,
            state=self.state,
            incarnation=self.incarnation,
            meta=self.meta,
            meta_version=max(0, self.have_version),
            state_since=self.state_since,
            meta_current=self.meta_current,
        )


def claim_is_newer(current: int, claimed: int, *, strictly: bool) -> bool:
    """Incarnation rule: alive needs a strictly higher incarnation, suspect/dead an equal one."""
    return claimed > current if strictly else claimed >= current


class MemberTable:
    """All known members (self included) plus tombstones of forgotten ones."""

    #: Tombstones kept, oldest dropped first.
    MAX_TOMBSTONES = 16384

    def __init__(self, local: str, rng: random.Random) -> None:
        self.local = local
        self.nodes: dict[str, NodeState] = {}
        #: forgotten dead/left members, oldest first
        self.tombstones: OrderedDict[str, Tombstone] = OrderedDict()
        self._rng = rng
        self._order: list[str] = []
        self._index = 0
        self._peers_cache: list[str] | None = None
        self._gone_cache: list[NodeState] | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.nodes

    def __iter__(self) -> Iterator[NodeState]:
        return iter(self.nodes.values())

    def get(self, name: str) -> NodeState | None:
        return self.nodes.get(name)

    def add(self, node: NodeState) -> None:
        self.nodes[node.name] = node
        self.tombstones.pop(node.name, None)
        if node.name != self.local:
            # a random slot keeps the round-robin order random for newcomers too
            self._order.insert(self._rng.randint(0, len(self._order)), node.name)
        self.changed()

    def forget(self, name: str) -> None:
        node = self.nodes.pop(name, None)
        if node is None:
            return
        self.tombstones[name] = Tombstone(node.incarnation, node.addr, node.state == State.LEFT)
        self.tombstones.move_to_end(name)
        while len(self.tombstones) > self.MAX_TOMBSTONES:
            self.tombstones.popitem(last=False)
        self.changed()

    def changed(self) -> None:
        """Invalidate cached peer lists (call after any state change)."""
        self._peers_cache = None
        self._gone_cache = None

    def live_peers(self) -> list[str]:
        """Alive or suspect members other than self (cached until a change)."""
        if self._peers_cache is None:
            self._peers_cache = [
                n.name
                for n in self.nodes.values()
                if n.name != self.local and n.state in (State.ALIVE, State.SUSPECT)
            ]
        return self._peers_cache

    def gone(self) -> list[NodeState]:
        """Dead or left members other than self (cached until a change)."""
        if self._gone_cache is None:
            self._gone_cache = [
                n
                for n in self.nodes.values()
                if n.name != self.local and n.state in (State.DEAD, State.LEFT)
            ]
        return self._gone_cache

    def active_count(self) -> int:
        """Members counted for timeouts and retransmits: alive + suspect, self included."""
        return len(self.live_peers()) + 1

    def next_probe_target(self) -> NodeState | None:
        """Randomised round-robin: every live member once per shuffled pass."""
        for _ in range(2):
            while self._index < len(self._order):
                name = self._order[self._index]
                self._index += 1
                node = self.nodes.get(name)
                if node is not None and node.state in (State.ALIVE, State.SUSPECT):
                    return node
            # end of a pass: drop forgotten names, reshuffle
            self._order = [n for n in self._order if n in self.nodes]
            self._rng.shuffle(self._order)
            self._index = 0
        return None
