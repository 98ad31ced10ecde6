"""Layer A of the election: what the announcing views say together about each IP.

Combining the claims of several views (same ports, same binding, agreeing
preferences?) is the part of the rule that depends only on configurations,
not on who is alive; :class:`~duravip.election.rule.Resolver` caches it while
the set of distinct live ``vips`` mappings stays the same.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

from attrs import frozen

from duravip.election.view import VipClaim
from duravip.ipaddr import IPAddress, ip_key

__all__ = ["BROKEN", "CONFLICT", "NO_STATES", "UNSAFE", "Info", "combine", "derived"]

#: Nodes name different preferred owners: preferences are ignored.
CONFLICT = "CONFLICT"
#: Nodes disagree on ports or on the followed binding: served, but flagged.
UNSAFE = "UNSAFE"
#: Nodes announce different bindings for the IP: nobody owns it.
BROKEN = "BROKEN"
NO_STATES: frozenset[str] = frozenset()


@frozen
class Info:
    """What the announcing (alive) views say together about one IP."""

    states: frozenset[str]
    preferred: str | None
    conflict: tuple[str, ...]  # the distinct preferred nodes when CONFLICT
    follows: int | None  # followed binding IP, as an int
    binding: str | None
    bindings: tuple[str, ...]  # distinct binding names when BROKEN
    follow_name: str | None


def combine(claims: list[VipClaim]) -> Info:
    first = claims[0]
    if len(claims) == 1:
        return Info(NO_STATES, first.preference, (), None, first.binding, (), first.follows)
    states: set[str] = set()
    ports = {c.listener_ports for c in claims}
    follows = {c.follows for c in claims}
    if len(ports) > 1 or len(follows) > 1:
        states.add(UNSAFE)
    bindings = {c.binding for c in claims}
    if len(bindings) > 1:
        states.add(BROKEN)
    prefs = {c.preference for c in claims if c.preference is not None}
    preferred: str | None = None
    if len(prefs) > 1:
        states.add(CONFLICT)
    elif prefs:
        preferred = next(iter(prefs))
    return Info(
        frozenset(states),
        preferred,
        tuple(sorted(prefs)) if len(prefs) > 1 else (),
        None,
        first.binding if len(bindings) == 1 else None,
        tuple(sorted(b or "-" for b in bindings)) if len(bindings) > 1 else (),
        first.follows if len(follows) == 1 else None,
    )


class _Derived:
    """Int-keyed, sorted form of one shared ``vips`` mapping (computed once)."""

    __slots__ = ("claims", "ints", "ipobjs", "packed", "vips")

    def __init__(self, vips: Mapping[IPAddress, VipClaim]) -> None:
        self.vips = vips  # keeps id(vips) valid while cached
        self.ipobjs = sorted(vips, key=ip_key)
        self.ints = [int(ip) for ip in self.ipobjs]
        self.packed = [ip.packed for ip in self.ipobjs]
        self.claims = [vips[ip] for ip in self.ipobjs]


_DERIVED: OrderedDict[int, _Derived] = OrderedDict()


def derived(vips: Mapping[IPAddress, VipClaim]) -> _Derived:
    d = _DERIVED.get(id(vips))
    if d is not None and d.vips is vips:
        _DERIVED.move_to_end(id(vips))
        return d
    d = _DERIVED[id(vips)] = _Derived(vips)
    while len(_DERIVED) > 64:
        _DERIVED.popitem(last=False)
    return d
