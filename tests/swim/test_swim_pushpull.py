"""swim.pushpull on its own: state records, the merge rule, join back-off, scaling."""

from __future__ import annotations

import attrs

from duravip.swim import codec
from duravip.swim.codec import NodeRecord, PushPull
from duravip.swim.members import Addr, State
from duravip.swim.metasync import MetaSync
from duravip.swim.pushpull import JOIN_BACKOFF_MAX, JOIN_BACKOFF_MIN, AntiEntropy, merge, records
from duravip.swim.replay import ReplayGuard
from duravip.swim.transitions import Transitions

from .contexts import KEY, T, addr, new_context

ALIVE, SUSPECT, DEAD, LEFT = (codec.STATE_CODES[s] for s in ("alive", "suspect", "dead", "left"))



def make(*peers: str, seeds: tuple[Addr, ...] = ()) -> AntiEntropy:
    ctx = new_context(*peers)
    tr = Transitions(ctx, MetaSync(ctx), ReplayGuard(), lambda name: None)
    return AntiEntropy(ctx, tr, seeds, 0.0)


def exchanges(sync: AntiEntropy) -> list[tuple[str, Addr, PushPull]]:
    out = []
    for r in sync.ctx.streams:
        if r.kind == "meta":
            continue  # view fetches of merged members: metasync's business
        msg = codec.decode_stream(KEY.open(r.data, "c", b"tcp").plaintext)
        assert isinstance(msg, PushPull)
        out.append((r.kind, r.addr, msg))
    sync.ctx.streams.clear()
    return out


def test_records_carry_members_then_tombstones() -> None:
    sync = make("a", "b")
    b = sync.ctx.table.get("b")
    assert b is not None
    b.state = State.LEFT
    sync.ctx.table.forget("b")
    recs = records(sync.ctx.table)
    assert [(r.name, r.state) for r in recs] == [("x", ALIVE), ("a", ALIVE), ("b", LEFT)]


def test_merge_takes_alive_and_left_but_a_remote_death_only_as_a_suspicion() -> None:
    sync = make()
    merge(
        [
            NodeRecord("a", addr(1), 2, ALIVE, 0, 0, 0),
            NodeRecord("b", addr(2), 0, ALIVE, 0, 0, 0),
            NodeRecord("c", addr(3), 0, ALIVE, 0, 0, 0),
        ],
        sync.transitions,
        1.0,
    )
    merge(
        [NodeRecord("b", addr(2), 0, DEAD, 0, 0, 0), NodeRecord("c", addr(3), 0, LEFT, 0, 0, 0)],
        sync.transitions,
        2.0,
    )
    states = {n.name: n.state for n in sync.ctx.table}
    assert states == {"x": State.ALIVE, "a": State.ALIVE, "b": State.SUSPECT, "c": State.LEFT}


def test_join_retries_with_back_off_until_a_peer_is_live() -> None:
    seeds = (addr(1), addr(2))
    sync = make(seeds=seeds)
    assert [(k, a, m.join) for k, a, m in exchanges(sync)] == [
        ("join", addr(1), True),
        ("join", addr(2), True),
    ]
    assert sync.join_at == JOIN_BACKOFF_MIN and sync.joins_inflight == 2
    sync.tick(sync.join_at)  # both still in flight: wait, no new round
    assert exchanges(sync) == []
    sync.done(True, None, 0.3)
    sync.done(True, None, 0.3)
    assert sync.ctx.counters["push_pull_failed"] == 2
    sync.tick(sync.join_at)
    assert len(exchanges(sync)) == 2 and sync.join_backoff == 4 * JOIN_BACKOFF_MIN
    reply = PushPull(False, (NodeRecord("s", addr(1), 0, ALIVE, 0, 0, 0),))
    sync.done(True, reply, 1.0)
    assert sync.ctx.counters["push_pull_ok"] == 1 and sync.ctx.table.get("s") is not None
    now = sync.join_at
    sync.tick(now)  # joined: the back-off resets, the seeds are only checked now and then
    assert sync.join_backoff == JOIN_BACKOFF_MIN and exchanges(sync) == []
    assert sync.join_at == now + JOIN_BACKOFF_MAX
    assert sync.next_deadline(99.0) == now + JOIN_BACKOFF_MAX


def test_the_period_grows_with_the_cluster_beyond_32() -> None:
    assert make(*(f"p{i}" for i in range(31))).interval() == T.push_pull_interval
    assert make(*(f"p{i}" for i in range(63))).interval() == 2 * T.push_pull_interval
    assert make(*(f"p{i}" for i in range(127))).interval() == 3 * T.push_pull_interval


def test_the_periodic_exchange_also_tries_a_dead_member() -> None:
    sync = make("a", "b")
    b = sync.ctx.table.get("b")
    assert b is not None
    b.state = State.DEAD
    sync.ctx.table.changed()
    sync.tick(sync.next_push_pull())
    assert [(k, a) for k, a, _ in exchanges(sync)] == [
        ("push_pull", addr(1)),
        ("push_pull", addr(2)),
    ]
    assert sync.ctx.counters["reconnect_attempts"] == 1
    sync.ctx.leaving = True
    sync.tick(sync.next_push_pull())
    assert exchanges(sync) == []


def test_serve_merges_first_then_answers_with_our_state() -> None:
    sync = make("a")
    reply = sync.serve(PushPull(False, (NodeRecord("n", addr(5), 0, ALIVE, 0, 0, 0),)), 1.0)
    assert not reply.join
    assert {r.name for r in reply.records} == {"x", "a", "n"}
    assert reply.records == records(sync.ctx.table)


def test_settings_are_read_at_use_so_a_reload_applies() -> None:
    sync = make()
    sync.ctx.timers = attrs.evolve(T, push_pull_interval=5.0)
    assert sync.interval() == 5.0
