"""The cluster picture the election reads: SWIM members in, decoded views out.

Sans-IO (no trio, no clock): the daemon feeds every SWIM membership snapshot
to a :class:`ViewTracker` and acts on what :meth:`ViewTracker.update` returns.
The rules that used to live in the daemon live here, where they can be tested
without a network:

* each member's view is decoded once per meta version (an undecodable one is
  reported, never fatal: a peer's bad bytes must not stop this node);
* a node back from ``dead`` or ``left`` whose current view is still being
  fetched keeps its claims but is not a candidate yet (the cached view may be
  a previous run's, which was mature);
* a heal, and a rival claiming or releasing an IP we hold, ask for a
  re-announce (gratuitous ARP): clients may have followed the rival's ARP.

The pure helpers below (:func:`holders_by_ip`, :func:`binding_holders`,
:func:`mmove_peers`, :func:`reannounce_targets`) answer the questions mail
routing, the console and the re-announce loop ask of one snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
from attrs import frozen

from duravip.config import HostPort
from duravip.election.quorum import LIVE_STATES
from duravip.election.rule import Decision
from duravip.election.view import NodeView, decode
from duravip.ipaddr import IPAddress, ip_key
from duravip.swim.members import Member, State

__all__ = [
    "ClusterSnapshot",
    "DroppedView",
    "PictureUpdate",
    "ViewTracker",
    "binding_holders",
    "handed_off",
    "holders_by_ip",
    "mmove_peers",
    "reannounce_targets",
]

_GONE = (State.DEAD, State.LEFT)


@frozen
class ClusterSnapshot:
    """The membership as the election needs it."""

    local: str
    #: node -> SWIM state (suspect counts as alive: see ``LIVE_STATES``).
    states: Mapping[str, State]
    #: Latest decoded view per node (a node may have none yet).
    views: Mapping[str, NodeView]


@frozen
class DroppedView:
    """A member's meta that failed to decode (counted, logged, skipped)."""

    node: str
    error: str


@frozen
class PictureUpdate:
    """What one SWIM snapshot changed."""

    snapshot: ClusterSnapshot
    #: Gratuitous ARP for the IPs held here is due (a heal, a rival's claim or release).
    reannounce: bool
    #: A member's view was (re)decoded: the console's "views stable for" restarts.
    views_changed: bool
    dropped: tuple[DroppedView, ...] = ()


class ViewTracker:
    """Adapts successive SWIM snapshots into :class:`ClusterSnapshot` values.

    Keeps what must survive between snapshots: the decoded view per meta
    version, the previous states (to spot a rejoin), the nodes whose current
    view is still being fetched after a rejoin, and each node's previous held
    set (to spot a rival's claim or release).
    """

    def __init__(self, local: str) -> None:
        self.local = local
        self._decoded: dict[str, tuple[int, NodeView]] = {}
        self._prev_states: dict[str, State] = {}
        self._rejoining: set[str] = set()
        self._prev_views: dict[str, NodeView] = {}

    def update(
        self, members: Mapping[str, Member], held: frozenset[IPAddress]
    ) -> PictureUpdate:
        """Feed one snapshot; ``held`` is what this node holds right now."""
        states: dict[str, State] = {}
        views: dict[str, NodeView] = {}
        dropped: list[DroppedView] = []
        changed = False
        reannounce = False
        for name, member in members.items():
            states[name] = member.state
            if not member.meta:
                continue
            cached = self._decoded.get(name)
            if cached is not None and cached[0] == member.meta_version:
                view = cached[1]
            else:
                try:
                    view = decode(member.meta)
                except ValueError as e:
                    dropped.append(DroppedView(name, str(e)))
                    continue
                self._decoded[name] = (member.meta_version, view)
                changed = True
            if member.state in LIVE_STATES and self._prev_states.get(name) in _GONE:
                self._rejoining.add(name)
                reannounce = True  # a heal, a resume or a restart: clients may hold stale ARP
            if member.meta_current:
                self._rejoining.discard(name)
            elif name in self._rejoining and view.mature:
                # Back from dead or left, its current view still being fetched: the
                # cached one may be a previous run's (that run was mature, this one is
                # not yet). Its claims on IPs still count; its candidacy waits.
                view = attrs.evolve(view, mature=False)
            previous = self._prev_views.get(name)
            before = previous.held if previous is not None else frozenset()
            if name != self.local and (before ^ view.held) & held:
                # A rival claimed or released an IP we hold (a heal, a resume):
                # clients may have followed its ARP; make them follow us again.
                reannounce = True
            self._prev_views[name] = view
            views[name] = view
        for gone in set(self._decoded) - set(members):
            del self._decoded[gone]
        self._prev_states = states
        return PictureUpdate(
            snapshot=ClusterSnapshot(local=self.local, states=states, views=views),
            reannounce=reannounce,
            views_changed=changed,
            dropped=tuple(dropped),
        )


def holders_by_ip(snap: ClusterSnapshot) -> dict[IPAddress, list[str]]:
    """IP -> the live nodes whose view says they hold it, sorted by name."""
    out: dict[IPAddress, list[str]] = {}
    for name in sorted(snap.views):
        if snap.states.get(name) in LIVE_STATES:
            for ip in snap.views[name].held:
                out.setdefault(ip, []).append(name)
    return out


def binding_holders(
    snap: ClusterSnapshot,
    decisions: Mapping[IPAddress, Decision],
    bindings: Mapping[str, IPAddress],
) -> dict[str, str | None]:
    """Binding name -> the node whose mail leaves from its IP now.

    ``bindings``: the DuraVIP bindings (name -> bind address). A live holder
    wins over the elected owner (mail follows the address, and the owner may
    not have plumbed it yet); among several holders the greatest name wins,
    so every node picks the same one.
    """
    holders = {ip: hs[-1] for ip, hs in holders_by_ip(snap).items()}
    out: dict[str, str | None] = {}
    for name, ip in bindings.items():
        d = decisions.get(ip)
        out[name] = holders.get(ip) or (d.owner if d else None)
    return out


def mmove_peers(snap: ClusterSnapshot) -> dict[str, HostPort]:
    """Live node -> its ``ECCluster_Listener`` (where queues are moved to)."""
    return {
        name: v.mmove_addr
        for name, v in snap.views.items()
        if v.mmove_addr is not None and snap.states.get(name) in LIVE_STATES
    }


def reannounce_targets(
    snap: ClusterSnapshot,
    decisions: Mapping[IPAddress, Decision],
    held: frozenset[IPAddress],
) -> list[IPAddress]:
    """The held IPs to announce again: owned here and claimed by no other live node.

    Announcing a contested IP would pull clients to a holder that may be
    about to release it, and their ARP lock time would then ignore the real
    owner's gratuitous ARP.
    """
    contested = {ip for ip, hs in holders_by_ip(snap).items() if set(hs) - {snap.local}}
    return sorted(
        (
            ip
            for ip in held
            if (d := decisions.get(ip)) is not None
            and d.owner == snap.local
            and ip not in contested
        ),
        key=ip_key,
    )


def handed_off(snap: ClusterSnapshot, released: frozenset[IPAddress]) -> bool:
    """True once every IP in ``released`` is held by another live node, or by nobody able to.

    A graceful stop waits for this before moving queues: mail follows the
    holders, so they must be known first. An IP no other live node announces
    has nobody to wait for.
    """
    others = {
        n: v for n, v in snap.views.items() if n != snap.local and snap.states.get(n) in LIVE_STATES
    }
    held = set().union(*(v.held for v in others.values()))
    announced = set().union(*(v.vips.keys() for v in others.values()))
    return all(ip in held or ip not in announced for ip in released)
