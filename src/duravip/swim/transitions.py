"""Member state transitions: alive, suspect, dead, left, and forgetting.

The incarnation rules: a claim about a member with a lower incarnation than
the one we hold is stale; an alive needs a strictly higher one, a suspect or
dead the same or higher. A claim about ourselves is refuted by out-bidding it
(a higher incarnation, gossiped and told to the claimant). A suspicion runs a
Lifeguard timer that independent confirmations shorten; when it expires the
member is declared dead, and dead or left members are forgotten (kept as a
tombstone) after ``dead_node_reclaim_time``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from duravip.swim import codec
from duravip.swim.codec import Alive, Dead, Suspect, saturating_inc
from duravip.swim.context import Context
from duravip.swim.members import EventKind, MemberEvent, NodeState, State
from duravip.swim.metasync import MetaSync
from duravip.swim.replay import ReplayGuard
from duravip.swim.suspicion import Suspicion, min_timeout


class Transitions:
    """Applies alive / suspect / dead claims to the member table."""

    def __init__(
        self,
        ctx: Context,
        meta: MetaSync,
        replay: ReplayGuard,
        probe_soon: Callable[[str], None],
        confirm_now: Callable[[str, float], None] | None = None,
    ) -> None:
        """``probe_soon(name)`` asks the prober to probe a fresh suspect next;
        ``confirm_now(name, now)`` to probe one a peer suspects right now."""
        self.ctx = ctx
        self.meta = meta
        self.replay = replay
        self.probe_soon = probe_soon
        self.confirm_now = confirm_now
        self.suspicions: dict[str, Suspicion] = {}
        #: our own suspicions -> the peers we told directly (a refutation follows the same way)
        self.told: dict[str, list[str]] = {}
        self.next_reap = math.inf

    # ------------------------------------------------------------------ claims

    def on_alive(self, a: Alive, now: float, rebroadcast: bool = True) -> None:
        ctx = self.ctx
        if a.name == ctx.name:
            local = ctx.local
            if ctx.leaving or a.incarnation < local.incarnation:
                return
            same = (a.addr, a.meta_version, a.meta_digest) == (
                local.addr,
                local.meta_version,
                local.meta_digest,
            )
            if a.incarnation == local.incarnation and same:
                return
            self.refute(a.incarnation, None, now, min_meta_version=saturating_inc(a.meta_version))
            return
        node = ctx.table.get(a.name)
        if node is None:
            tomb = ctx.table.tombstones.get(a.name)
            if tomb is not None and a.incarnation <= tomb.incarnation:
                ctx.counters["dropped_stale"] += 1
                return
            node = NodeState(a.name, a.addr, a.incarnation, now)
            _set_announced(node, a)
            ctx.table.add(node)
            ctx.touch(node, "joined")
            if rebroadcast:
                ctx.broadcast_alive(node)
            self.meta.want(node, now)
            return
        if a.incarnation <= node.incarnation:
            if a.incarnation < node.incarnation:
                ctx.counters["dropped_stale"] += 1
            return
        prev = node.state
        node.incarnation = a.incarnation
        node.addr = a.addr
        _set_announced(node, a)
        if prev != State.ALIVE:
            node.state = State.ALIVE
            node.state_since = now
        self.suspicions.pop(a.name, None)
        for name in self.told.pop(a.name, ()):
            peer = ctx.table.get(name)
            if peer is not None and peer.state in (State.ALIVE, State.SUSPECT):
                ctx.send(name, peer.addr, [ctx.alive_msg(node)], piggyback=False)
        ctx.table.changed()
        kind: EventKind = (
            "alive"
            if prev == State.SUSPECT
            else "joined"
            if prev in (State.DEAD, State.LEFT)
            else "updated"
        )
        ctx.touch(node, kind)
        if rebroadcast:
            ctx.broadcast_alive(node)
        self.meta.want(node, now)

    def on_suspect(self, s: Suspect, now: float) -> None:
        ctx = self.ctx
        t = ctx.timers
        if s.name == ctx.name:
            if ctx.leaving:
                return
            if s.incarnation < ctx.local.incarnation:
                # already refuted; the sender may have missed it, answer it directly
                self.tell_alive(s.sender)
                return
            self.refute(s.incarnation, s.sender, now)
            return
        node = ctx.table.get(s.name)
        if node is None or s.incarnation < node.incarnation:
            ctx.counters["dropped_stale"] += 1
            return
        if node.state in (State.DEAD, State.LEFT):
            return
        if node.state == State.SUSPECT and s.incarnation == node.incarnation:
            susp = self.suspicions.get(s.name)
            if susp is not None and susp.confirm(s.sender):
                ctx.counters["suspect_confirmations"] += 1
                # pass the confirmation on with the copies of the suspicion still pending;
                # our own observation gets one gossip round's worth of copies more, not a
                # full wave (a wave per confirming node would cost O(n) waves at scale)
                payload = codec.encode_message(s)
                if not ctx.broadcasts.refresh(s.name, payload) and s.sender == ctx.name:
                    ctx.broadcasts.queue(s.name, payload, max(0, ctx.limit() - t.gossip_nodes))
            return
        node.incarnation = s.incarnation
        node.state = State.SUSPECT
        node.state_since = now
        ctx.table.changed()
        n = ctx.table.active_count()
        lo = min_timeout(t.suspicion_mult, n, t.probe_interval)
        self.suspicions[s.name] = Suspicion(
            incarnation=s.incarnation,
            sender=s.sender,
            k=min(t.indirect_checks, n - 2),
            min_t=lo,
            max_t=lo * t.suspicion_max_timeout_mult,
            start=now,
        )
        ctx.counters["suspected"] += 1
        ctx.mark(s.name, "suspect", now)
        ctx.touch(node, "suspect")
        ctx.broadcasts.queue(s.name, codec.encode_message(s))
        # probe the suspect next (with the suspicion attached, Lifeguard's buddy system):
        # a live one refutes to us directly, a dead one is confirmed sooner
        if s.sender == ctx.name:
            self.probe_soon(s.name)
            # tell the suspect at once: it refutes in one round trip
            ctx.send(node.name, node.addr, [s])
            # and a few peers: each probes it now (its confirmation or the refutation
            # comes a probe period sooner than through the next gossip round)
            peers = [n for n in ctx.table.live_peers() if n != s.name]
            if len(peers) > t.gossip_nodes:
                peers = ctx.rng.sample(peers, t.gossip_nodes)
            for name in peers:
                peer = ctx.table.get(name)
                if peer is not None:
                    ctx.send(name, peer.addr, [s], piggyback=False)
            self.told[s.name] = peers
        elif self.confirm_now is not None:
            self.confirm_now(s.name, now)
        else:
            self.probe_soon(s.name)

    def on_dead(self, d: Dead, now: float) -> None:
        """A death (or, ``sender == name``, a graceful leave) of ``d.name``."""
        ctx = self.ctx
        left = d.sender == d.name
        if d.name == ctx.name:
            if ctx.leaving or d.incarnation < ctx.local.incarnation:
                return
            self.refute(d.incarnation, d.sender, now)
            return
        node = ctx.table.get(d.name)
        if node is None or d.incarnation < node.incarnation:
            ctx.counters["dropped_stale"] += 1
            return
        if node.state in (State.DEAD, State.LEFT):
            return
        node.incarnation = d.incarnation
        node.state = State.LEFT if left else State.DEAD
        node.state_since = now
        self.suspicions.pop(d.name, None)
        self.told.pop(d.name, None)
        self.replay.forget(d.name)  # its next boot is accepted whatever its clock says
        ctx.table.changed()
        ctx.mark(d.name, "left" if left else "dead", now)
        ctx.touch(node, "left" if left else "dead")
        ctx.broadcasts.queue(d.name, codec.encode_message(d))
        self.next_reap = min(self.next_reap, now + self._reclaim_after())

    # ------------------------------------------------------------------ about ourselves

    def refute(
        self, incarnation: int, sender: str | None, now: float, min_meta_version: int = 0
    ) -> None:
        """Somebody claims we are suspect/dead (or stale): out-bid them with a higher incarnation."""
        ctx = self.ctx
        local = ctx.local
        local.incarnation = saturating_inc(max(local.incarnation, incarnation))
        # keep our view version monotonic across restarts
        local.meta_version = local.have_version = max(local.meta_version, min_meta_version)
        ctx.counters["refutes"] += 1
        ctx.awareness.apply_delta(1)
        ctx.broadcast_alive(local)
        if sender is not None:
            self.tell_alive(sender)
        ctx.touch(local, "updated")

    def tell_alive(self, name: str) -> None:
        """Send our current alive straight to ``name`` (a suspecter that must hear the refutation)."""
        ctx = self.ctx
        node = ctx.table.get(name)
        if node is not None and node is not ctx.local:
            ctx.counters["direct_refutes"] += 1
            ctx.send(name, node.addr, [ctx.alive_msg(ctx.local)], piggyback=False)

    # ------------------------------------------------------------------ timers

    def tick_suspicions(self, now: float) -> None:
        """Declare dead every suspect whose suspicion timer ran out unrefuted."""
        if not self.suspicions:
            return
        for name, s in list(self.suspicions.items()):
            if now < s.deadline:
                continue
            del self.suspicions[name]
            node = self.ctx.table.get(name)
            if (
                node is not None
                and node.state == State.SUSPECT
                and node.incarnation == s.incarnation
            ):
                self.ctx.counters["declared_dead"] += 1
                self.on_dead(Dead(node.incarnation, name, self.ctx.name), now)

    def _reclaim_after(self) -> float:
        t = self.ctx.timers
        return max(t.dead_node_reclaim_time, t.gossip_to_the_dead_time)

    def reap(self, now: float) -> None:
        """Forget the dead and left members whose reclaim time is over."""
        ctx = self.ctx
        nxt = math.inf
        for node in list(ctx.table.gone()):
            if node is ctx.local or node.state not in (State.DEAD, State.LEFT):
                continue
            if node.state_since + self._reclaim_after() <= now:
                ctx.table.forget(node.name)
                ctx.marks.pop(node.name, None)
                m = ctx.public.pop(node.name)
                ctx.events.append(MemberEvent("forgotten", m))
                self.meta.forget(node.name)
            else:
                nxt = min(nxt, node.state_since + self._reclaim_after())
        self.next_reap = nxt

    def next_deadline(self, d: float) -> float:
        """``d`` or the earliest suspicion timeout or reap, whichever comes first."""
        d = min(d, self.next_reap)
        for s in self.suspicions.values():
            d = min(d, s.deadline)
        return d


def _set_announced(node: NodeState, a: Alive) -> None:
    node.meta_version = a.meta_version
    node.meta_digest = a.meta_digest
    node.meta_len = a.meta_len
