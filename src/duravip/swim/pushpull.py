"""Anti-entropy over TCP: joining through seeds and the periodic full-state exchange.

A push-pull sends every record we hold (members and tombstones) and merges
the peer's reply. Joining is a push-pull with each seed, retried with
back-off while we know no live peer. The periodic exchange picks one random
live member and, to heal partitions, one member we believe dead; its period
grows with the cluster size beyond 32 nodes (memberlist's rule), so the load
per node stays flat.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from duravip.swim import codec
from duravip.swim.codec import Alive, Dead, NodeRecord, PushPull, Suspect
from duravip.swim.context import Context
from duravip.swim.members import Addr, MemberTable, State
from duravip.swim.transitions import Transitions

#: Join retries back off from this to ``JOIN_BACKOFF_MAX`` seconds.
JOIN_BACKOFF_MIN = 0.25
JOIN_BACKOFF_MAX = 4.0


def records(table: MemberTable) -> tuple[NodeRecord, ...]:
    """The full state as push-pull records: every member, then every tombstone."""
    recs = [
        NodeRecord(
            n.name,
            n.addr,
            n.incarnation,
            codec.STATE_CODES[n.state.value],
            n.meta_version,
            n.meta_digest,
            n.meta_len,
        )
        for n in table
    ]
    dead, left = codec.STATE_CODES["dead"], codec.STATE_CODES["left"]
    recs += [
        NodeRecord(name, t.addr, t.incarnation, left if t.left else dead, 0, 0, 0)
        for name, t in table.tombstones.items()
    ]
    return tuple(recs)


def merge(records: Sequence[NodeRecord], transitions: Transitions, now: float) -> None:
    """Push-pull state merge; a remote 'dead' only makes us suspect (memberlist rule)."""
    me = transitions.ctx.name
    for r in records:
        state = codec.STATE_NAMES[r.state]
        if state == "alive":
            transitions.on_alive(
                Alive(r.incarnation, r.name, r.addr, r.meta_version, r.meta_digest, r.meta_len),
                now,
            )
        elif state == "left":
            transitions.on_dead(Dead(r.incarnation, r.name, r.name), now)
        else:
            transitions.on_suspect(Suspect(r.incarnation, r.name, me), now)


class AntiEntropy:
    """Join and periodic push-pull scheduling, both sides of the exchange."""

    def __init__(
        self, ctx: Context, transitions: Transitions, seeds: Sequence[Addr], now: float
    ) -> None:
        self.ctx = ctx
        self.transitions = transitions
        self.seeds = tuple(seeds)
        # the push-pull period follows the cluster size (it is recomputed on every use)
        self.last = now
        self.factor = ctx.rng.uniform(0.5, 1.0)
        self.join_backoff = JOIN_BACKOFF_MIN
        self.join_at = now
        self.joins_inflight = 0
        if self.seeds:
            self.start_join(self.seeds, now)

    def start_join(self, addrs: Iterable[Addr], now: float) -> None:
        """One push-pull with each of ``addrs``; the next round backs off."""
        for a in addrs:
            self.joins_inflight += 1
            self.ctx.new_stream("join", a, PushPull(True, records(self.ctx.table)))
        self.join_at = now + self.join_backoff
        self.join_backoff = min(JOIN_BACKOFF_MAX, self.join_backoff * 2)

    def interval(self) -> float:
        """memberlist's scaling: slower anti-entropy beyond 32 nodes keeps per-node load flat."""
        n = self.ctx.table.active_count()
        base = self.ctx.timers.push_pull_interval
        if n <= 32:
            return base
        return base * (math.ceil(math.log2(n) - math.log2(32)) + 1)

    def next_push_pull(self) -> float:
        return self.last + self.interval() * self.factor

    def _joining(self) -> bool:
        return bool(self.seeds) and not self.ctx.leaving

    def next_deadline(self, d: float) -> float:
        """``d`` or the next push-pull or join retry, whichever comes first."""
        d = min(d, self.next_push_pull())
        if self._joining():
            d = min(d, self.join_at)
        return d

    def tick(self, now: float) -> None:
        ctx = self.ctx
        if now >= self.next_push_pull():
            self._periodic(now)
            self.last = now
            self.factor = ctx.rng.uniform(0.9, 1.1)
        if self._joining() and now >= self.join_at:
            if ctx.table.live_peers():
                self.join_backoff = JOIN_BACKOFF_MIN
                self.join_at = now + JOIN_BACKOFF_MAX
            elif self.joins_inflight == 0:
                self.start_join(self.seeds, now)
            else:
                self.join_at = now + self.join_backoff  # still waiting for the last round

    def _periodic(self, now: float) -> None:
        ctx = self.ctx
        if ctx.leaving:
            return
        table = ctx.table
        peers = table.live_peers()
        if peers:
            node = table.get(ctx.rng.choice(peers))
            if node is not None:
                ctx.new_stream("push_pull", node.addr, PushPull(False, records(table)))
        # reconnect: try one member we believe dead (or forgot); after a partition heals
        # this is what brings the two sides back together
        dead = [n.addr for n in table.gone() if n.state == State.DEAD]
        dead += [t.addr for t in table.tombstones.values() if not t.left]
        if dead:
            ctx.counters["reconnect_attempts"] += 1
            ctx.new_stream("push_pull", ctx.rng.choice(dead), PushPull(False, records(table)))

    def serve(self, msg: PushPull, now: float) -> PushPull:
        """Server side: merge the peer's state, answer with ours (as it is after the merge)."""
        merge(msg.records, self.transitions, now)
        return PushPull(False, records(self.ctx.table))

    def done(self, join: bool, msg: codec.StreamMessage | None, now: float) -> None:
        """Client side: our push-pull (``join``: a join round's) ended with ``msg``."""
        if join:
            self.joins_inflight = max(0, self.joins_inflight - 1)
        if isinstance(msg, PushPull):
            self.ctx.counters["push_pull_ok"] += 1
            merge(msg.records, self.transitions, now)
        else:
            self.ctx.counters["push_pull_failed"] += 1
