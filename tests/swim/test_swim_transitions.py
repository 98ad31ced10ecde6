"""swim.transitions on its own: incarnation rules, refutation, suspicion timers, reaping."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from duravip.swim import codec
from duravip.swim.codec import Alive, Dead, Suspect
from duravip.swim.context import Context
from duravip.swim.members import Addr, State
from duravip.swim.metasync import MetaSync
from duravip.swim.replay import ReplayGuard
from duravip.swim.transitions import Transitions

from .contexts import KEY, addr, new_context


def make(*peers: str) -> tuple[Transitions, list[str]]:
    ctx = new_context(*peers)
    ctx.events.clear()
    soon: list[str] = []
    return Transitions(ctx, MetaSync(ctx), ReplayGuard(), soon.append), soon


def sent(ctx: Context) -> list[tuple[Addr, list[codec.Message]]]:
    out = [
        (a, codec.decode_packet(KEY.open(d, "c", b"udp").plaintext).messages) for d, a in ctx.out
    ]
    ctx.out.clear()
    return out


def kinds(ctx: Context) -> list[tuple[str, str]]:
    out = [(e.kind, e.member.name) for e in ctx.events]
    ctx.events.clear()
    return out


def test_a_new_member_joins_and_its_view_is_fetched() -> None:
    tr, _ = make()
    tr.on_alive(Alive(3, "a", addr(1), 2, 1234, 10), 1.0)
    node = tr.ctx.table.get("a")
    assert node is not None and node.state == State.ALIVE and node.incarnation == 3
    assert kinds(tr.ctx) == [("joined", "a")]
    assert tr.ctx.broadcasts.pending("a") is not None
    [req] = tr.ctx.streams
    assert req.kind == "meta" and req.addr == addr(1)


def test_alive_needs_a_higher_incarnation() -> None:
    tr, _ = make("a")
    tr.ctx.table.get("a").incarnation = 5
    tr.on_alive(Alive(4, "a", addr(1), 0, 0, 0), 1.0)
    assert tr.ctx.counters["dropped_stale"] == 1
    tr.on_alive(Alive(5, "a", addr(1), 0, 0, 0), 1.0)  # same: silently nothing new
    assert tr.ctx.counters["dropped_stale"] == 1 and kinds(tr.ctx) == []


def test_alive_after_a_tombstone_needs_a_higher_incarnation() -> None:
    tr, _ = make("a")
    tr.on_dead(Dead(2, "a", "b"), 1.0)
    tr.ctx.table.forget("a")
    tr.on_alive(Alive(2, "a", addr(1), 0, 0, 0), 2.0)
    assert tr.ctx.table.get("a") is None and tr.ctx.counters["dropped_stale"] == 1
    tr.on_alive(Alive(3, "a", addr(1), 0, 0, 0), 2.0)
    assert tr.ctx.table.get("a") is not None


def test_suspect_starts_a_lifeguard_timer_and_asks_for_a_probe() -> None:
    tr, soon = make("a", "b", "c", "d")
    tr.on_suspect(Suspect(0, "a", "x"), 1.0)
    assert tr.ctx.table.get("a").state == State.SUSPECT
    assert soon == ["a"]
    s = tr.suspicions["a"]
    assert s.k == 3  # min(indirect_checks, n - 2) with n = 5
    assert s.deadline == 1.0 + s.max_t  # no confirmation yet: the longest timeout
    # our own suspicion is told to the suspect at once (it refutes in one round trip)
    assert any(Suspect(0, "a", "x") in msgs for a, msgs in sent(tr.ctx) if a == addr(1))
    before = s.deadline
    tr.on_suspect(Suspect(0, "a", "b"), 1.1)  # an independent confirmation
    assert tr.ctx.counters["suspect_confirmations"] == 1 and s.deadline < before
    tr.on_suspect(Suspect(0, "a", "b"), 1.2)  # the same confirmer again: not counted
    assert tr.ctx.counters["suspect_confirmations"] == 1


def test_an_expired_suspicion_declares_death_unless_refuted() -> None:
    tr, _ = make("a", "b")
    tr.on_suspect(Suspect(0, "a", "x"), 1.0)
    tr.on_suspect(Suspect(0, "b", "x"), 1.0)
    tr.on_alive(Alive(1, "b", addr(2), 0, 0, 0), 1.5)  # b refutes
    assert "b" not in tr.suspicions
    deadline = tr.next_deadline(99.0)
    tr.tick_suspicions(deadline - 0.001)
    assert tr.ctx.table.get("a").state == State.SUSPECT
    tr.tick_suspicions(deadline)
    assert tr.ctx.table.get("a").state == State.DEAD
    assert tr.ctx.table.get("b").state == State.ALIVE
    assert tr.ctx.counters["declared_dead"] == 1


def test_claims_about_ourselves_are_refuted_with_a_higher_incarnation() -> None:
    tr, _ = make("a")
    ctx = tr.ctx
    tr.on_suspect(Suspect(4, "x", "a"), 1.0)
    assert ctx.local.incarnation == 5 and ctx.counters["refutes"] == 1
    assert ctx.awareness.score == 1  # being suspected hints that we are the slow one
    direct = [msgs for a, msgs in sent(ctx) if a == addr(1)]
    assert next(m for m in direct[0] if isinstance(m, Alive)).incarnation == 5
    # an older claim: already refuted, the claimant just hears our alive again
    tr.on_dead(Dead(3, "x", "a"), 1.1)
    tr.on_suspect(Suspect(3, "x", "a"), 1.2)
    assert ctx.local.incarnation == 5 and ctx.counters["refutes"] == 1
    assert ctx.counters["direct_refutes"] == 2


def test_a_leaving_node_refutes_nothing() -> None:
    tr, _ = make("a")
    tr.ctx.leaving = True
    tr.on_suspect(Suspect(0, "x", "a"), 1.0)
    tr.on_dead(Dead(0, "x", "a"), 1.0)
    tr.on_alive(Alive(9, "x", addr(5), 0, 0, 0), 1.0)
    assert tr.ctx.local.incarnation == 0 and tr.ctx.counters["refutes"] == 0


def test_dead_and_left_forget_the_replay_window_and_are_reaped() -> None:
    tr, _ = make("a", "b")
    tr.replay.accept("a", 10, b"s" * 8, 1)
    tr.on_dead(Dead(0, "a", "x"), 1.0)
    tr.on_dead(Dead(0, "b", "b"), 2.0)  # sender == name: a graceful leave
    assert tr.ctx.table.get("a").state == State.DEAD
    assert tr.ctx.table.get("b").state == State.LEFT
    assert tr.replay.epoch_of("a") is None  # its next boot is new whatever its clock says
    assert kinds(tr.ctx) == [("dead", "a"), ("left", "b")]
    tr.on_dead(Dead(0, "a", "x"), 1.5)  # already dead: nothing happens twice
    assert kinds(tr.ctx) == []
    assert tr.next_reap == 1.0 + 30.0
    tr.reap(31.0)
    assert tr.ctx.table.get("a") is None and tr.ctx.table.get("b") is not None
    assert tr.next_reap == 32.0
    tr.reap(32.0)
    assert kinds(tr.ctx) == [("forgotten", "a"), ("forgotten", "b")]
    assert set(tr.ctx.table.tombstones) == {"a", "b"} and tr.ctx.table.tombstones["b"].left


NAMES = ("x", "a", "b")
claims = st.one_of(
    st.builds(
        Alive,
        st.integers(0, 6),
        st.sampled_from(NAMES),
        st.just(addr(1)),
        st.integers(0, 3),
        st.just(0),
        st.just(0),
    ),
    st.builds(Suspect, st.integers(0, 6), st.sampled_from(NAMES), st.sampled_from(NAMES)),
    st.builds(Dead, st.integers(0, 6), st.sampled_from(NAMES), st.sampled_from(NAMES)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(claims, st.floats(0, 0.5)), max_size=40))
def test_incarnations_never_go_back_and_we_are_never_dead_to_ourselves(
    seq: list[tuple[Alive | Suspect | Dead, float]],
) -> None:
    tr, _ = make("a", "b")
    held = {n.name: n.incarnation for n in tr.ctx.table}
    now = 0.0
    for claim, dt in seq:
        now += dt
        if isinstance(claim, Alive):
            tr.on_alive(claim, now)
        elif isinstance(claim, Suspect):
            tr.on_suspect(claim, now)
        else:
            tr.on_dead(claim, now)
        tr.tick_suspicions(now)
        for n in tr.ctx.table:
            assert n.incarnation >= held.get(n.name, 0)
            held[n.name] = n.incarnation
        local = tr.ctx.local
        assert local.state == State.ALIVE
        if claim.name == "x" and not isinstance(claim, Alive):
            assert local.incarnation > claim.incarnation  # out-bid (or already above it)


def test_our_suspicion_goes_straight_to_the_peers_and_so_does_the_refutation() -> None:
    tr, soon = make("a", "b", "c")
    tr.on_suspect(Suspect(0, "a", "x"), 1.0)
    assert soon == ["a"] and tr.ctx.marks["a"]["suspect"] == 1.0
    out = sent(tr.ctx)
    # the suspect (to refute) and every other live peer (to probe it now) hear it at once
    for peer in (1, 2, 3):
        assert any(Suspect(0, "a", "x") in msgs for a, msgs in out if a == addr(peer))
    assert tr.told["a"] == ["b", "c"]
    tr.on_alive(Alive(1, "a", addr(1), 0, 0, 0), 1.01)  # a refutes to us
    out = sent(tr.ctx)
    for peer in (2, 3):  # passed on the way the suspicion went
        assert any(
            any(isinstance(m, Alive) and m.name == "a" and m.incarnation == 1 for m in msgs)
            for a, msgs in out
            if a == addr(peer)
        )
    assert "a" not in tr.told


def test_a_peers_suspicion_asks_for_a_probe_now() -> None:
    ctx = new_context("a", "b")
    now_probes: list[tuple[str, float]] = []
    soon: list[str] = []
    tr = Transitions(
        ctx, MetaSync(ctx), ReplayGuard(), soon.append, lambda n, t: now_probes.append((n, t))
    )
    tr.on_suspect(Suspect(0, "a", "b"), 2.0)
    assert now_probes == [("a", 2.0)] and soon == []
    tr.tick_suspicions(tr.suspicions["a"].deadline)
    assert tr.ctx.table.get("a").state == State.DEAD
    assert ctx.marks["a"]["suspect"] == 2.0 and ctx.marks["a"]["dead"] > 2.0
