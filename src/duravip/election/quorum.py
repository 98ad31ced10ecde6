"""``quorum = "majority"``: the last stable membership and the majority test.

The *stable membership* S, kept per node, is: the local node, plus every node
that has been seen ``alive`` or ``suspect`` without interruption for at least
``stable_after`` seconds at some time since this daemon started, minus every
node seen ``left`` (graceful leave) since. A node that dies stays in S: a
crash and a partition look the same from here, so the dead keep counting
against the quorum until they come back and leave gracefully (or this daemon
restarts). A node has quorum when it sees a strict majority of S alive.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import attrs

from duravip.election.rule import Decision
from duravip.ipaddr import IPAddress
from duravip.swim.members import State

__all__ = ["LIVE_STATES", "StableMembership", "apply_quorum", "has_quorum"]

#: Member states that count as alive (suspicion alone never moves an IP).
LIVE_STATES: frozenset[State] = frozenset({State.ALIVE, State.SUSPECT})


class StableMembership:
    """Tracks S from successive membership snapshots (sans-IO: time passed in)."""

    def __init__(self, local: str, stable_after: float) -> None:
        self.local = local
        self.stable_after = stable_after
        self._members: set[str] = {local}
        self._since: dict[str, float] = {}

    @property
    def members(self) -> frozenset[str]:
        return frozenset(self._members)

    def observe(self, now: float, states: Mapping[str, str]) -> None:
        """Feed the member states seen at time ``now``."""
        for node, state in states.items():
            if node == self.local:
                continue
            if state in LIVE_STATES:
                since = self._since.setdefault(node, now)
                if now - since >= self.stable_after:
                    self._members.add(node)
            else:
                self._since.pop(node, None)
                if state == "left":
                    self._members.discard(node)
        for node in list(self._since):
            if node not in states:
                del self._since[node]

    def next_deadline(self) -> float | None:
        """When the next live node becomes stable (call :meth:`observe` then)."""
        times = [t + self.stable_after for n, t in self._since.items() if n not in self._members]
        return min(times) if times else None


def has_quorum(alive: Collection[str], stable_members: Collection[str]) -> bool:
    """True when ``alive`` holds a strict majority of ``stable_members``."""
    stable = set(stable_members)
    seen = len(stable.intersection(alive))
    return 2 * seen > len(stable)


def apply_quorum(
    decisions: Mapping[IPAddress, Decision],
    *,
    local: str,
    alive: Collection[str],
    stable_members: Collection[str],
) -> Mapping[IPAddress, Decision]:
    """``decisions`` as seen by ``local``: every owner None without quorum."""
    live = set(alive) | {local}
    if has_quorum(live, stable_members):
        return decisions
    stable = set(stable_members)
    note = f"no quorum: sees {len(stable & live)} of {len(stable)} stable members"
    return {
        ip: attrs.evolve(d, owner=None, reason=f"{note} (would be {d.owner})")
        for ip, d in decisions.items()
    }
