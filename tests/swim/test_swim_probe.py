"""swim.probe on its own: probe scheduling, indirect probes, relays, awareness."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from duravip.swim import codec
from duravip.swim.codec import Ack, Alive, Nack, Ping, PingReq, Suspect
from duravip.swim.context import Context
from duravip.swim.members import Addr, State
from duravip.swim.probe import MAX_RELAYS, Prober

from .contexts import KEY, T, addr, new_context


def make(*peers: str) -> tuple[Prober, list[Suspect]]:
    ctx = new_context(*peers)
    suspected: list[Suspect] = []
    return Prober(ctx, lambda s, now: suspected.append(s), 0.0), suspected


def sent(ctx: Context) -> list[tuple[Addr, list[codec.Message]]]:
    out = [
        (a, codec.decode_packet(KEY.open(d, "c", b"udp").plaintext).messages) for d, a in ctx.out
    ]
    ctx.out.clear()
    return out


def start(p: Prober) -> float:
    """Run to the first probe; its start time."""
    now = p.next_probe
    assert 0.0 <= now <= T.probe_interval  # staggered start
    p.tick(now)
    assert p.probe is not None
    return now


def test_a_probe_pings_the_target_with_our_alive() -> None:
    p, _ = make("a", "b")
    now = start(p)
    probe = p.probe
    assert probe is not None
    [(to, msgs)] = sent(p.ctx)
    target = p.ctx.table.get(probe.target)
    assert target is not None and to == target.addr
    assert msgs[0] == Ping(probe.seq, probe.target, "x", addr(0))
    assert isinstance(msgs[1], Alive) and msgs[1].name == "x"
    assert probe.direct_deadline == now + T.probe_timeout and probe.end == now + T.probe_interval
    assert p.next_deadline(99.0) == probe.direct_deadline


def test_an_ack_ends_the_probe_and_improves_awareness() -> None:
    p, suspected = make("a", "b")
    p.ctx.awareness.score = 2
    start(p)
    assert p.probe is not None
    p.on_ack(p.probe.seq, p.probe.direct_deadline - 0.01)
    assert p.probe.acked and p.ctx.awareness.score == 1
    p.on_ack(p.probe.seq, p.probe.direct_deadline - 0.01)  # a duplicate ack changes nothing
    assert p.ctx.counters["acks_recv"] == 1
    p.tick(p.probe.end)
    assert suspected == [] and p.ctx.counters["probes_failed"] == 0


def test_no_ack_goes_indirect_then_suspects_and_counts_missing_nacks() -> None:
    p, suspected = make("a", "b", "c", "d", "e")
    start(p)
    probe = p.probe
    assert probe is not None
    sent(p.ctx)
    p.tick(probe.direct_deadline)
    reqs = [m for _, msgs in sent(p.ctx) for m in msgs if isinstance(m, PingReq)]
    assert len(reqs) == 3 == probe.expected_nacks  # indirect_checks helpers
    target = p.ctx.table.get(probe.target)
    assert target is not None
    assert all(r.target == probe.target and r.target_addr == target.addr for r in reqs)
    p.on_nack(probe.seq, probe.direct_deadline)
    p.tick(probe.end)
    assert suspected == [Suspect(0, probe.target, "x")]
    assert p.ctx.awareness.score == 2  # two of three helpers did not even nack
    assert p.ctx.counters["probes_failed"] == 1


def test_a_member_that_refuted_during_the_probe_is_not_suspected() -> None:
    p, suspected = make("a", "b")
    start(p)
    assert p.probe is not None
    target = p.ctx.table.get(p.probe.target)
    assert target is not None
    target.incarnation = 1
    p.tick(p.probe.end)
    assert suspected == [] and p.ctx.counters["probes_failed"] == 1


def test_a_fresh_suspect_is_probed_next_with_the_suspicion_attached() -> None:
    p, _ = make("a", "b", "c")
    node = p.ctx.table.get("c")
    assert node is not None
    node.state = State.SUSPECT
    p.ctx.table.changed()
    p.probe_soon("c")
    p.probe_soon("c")  # queued once
    assert p.urgent == ["c"]
    start(p)
    assert p.probe is not None and p.probe.target == "c"
    [(_, msgs)] = sent(p.ctx)
    assert Suspect(0, "c", "x") in msgs  # Lifeguard buddy system
    assert p.ctx.counters["urgent_probes"] == 1


def test_nacks_beyond_the_expected_count_are_stale() -> None:
    p, _ = make("a", "b")
    start(p)
    assert p.probe is not None
    p.on_nack(p.probe.seq, 0.0)  # no ping-req sent yet: nobody owes us a nack
    assert p.ctx.counters["nacks_recv"] == 0 and p.ctx.counters["dropped_stale"] == 1


def test_pings_are_answered_only_at_the_senders_known_address() -> None:
    p, _ = make("a")
    p.on_ping(Ping(9, "x", "a", addr(1)), "a", addr(1))
    [(to, msgs)] = sent(p.ctx)
    assert to == addr(1) and msgs[0] == Ack(9)
    p.on_ping(Ping(9, "x", "a", addr(1)), "a", ("10.9.9.9", 1))  # forged source: no answer
    p.on_ping(Ping(9, "w", "a", addr(1)), "a", addr(1))  # meant for another node
    assert sent(p.ctx) == []
    assert p.ctx.counters["dropped_unknown_addr"] == 1
    assert p.ctx.counters["dropped_misdirected"] == 1
    # first contact from a member we do not know yet: a bare ack to its stated address
    p.on_ping(Ping(3, "x", "n", ("10.0.0.50", 4801)), "n", ("10.0.0.50", 4801))
    [(to, msgs)] = sent(p.ctx)
    assert to == ("10.0.0.50", 4801) and msgs == [Ack(3), p.ctx.alive_msg(p.ctx.local)]


def test_a_relayed_probe_forwards_the_ack_or_nacks_in_time() -> None:
    p, _ = make("a", "b")
    p.on_ping_req(PingReq(77, "b", addr(2), "a", addr(1), True), "a", addr(1), 1.0)
    [(to, msgs)] = sent(p.ctx)
    ping = msgs[0]
    assert to == addr(2) and isinstance(ping, Ping) and ping.target == "b"
    p.on_ack(ping.seq, 1.0)
    [(to, msgs)] = sent(p.ctx)
    assert to == addr(1) and msgs[0] == Ack(77)  # the requester's own sequence number
    # a second relay whose target stays silent: a nack before the requester gives up
    p.on_ping_req(PingReq(78, "b", addr(2), "a", addr(1), True), "a", addr(1), 2.0)
    sent(p.ctx)
    p.tick(2.0 + T.probe_timeout * 0.8)
    assert any(Nack(78) in msgs for to, msgs in sent(p.ctx) if to == addr(1))
    p.tick(2.0 + T.probe_interval * 2)
    assert p.relays == {}


def test_ping_req_is_never_reflected_to_an_address_we_do_not_know() -> None:
    p, _ = make("a", "b")
    p.on_ping_req(PingReq(1, "b", ("10.9.9.9", 1), "a", addr(1), True), "a", addr(1), 1.0)
    p.on_ping_req(PingReq(1, "x", addr(0), "a", addr(1), True), "a", addr(1), 1.0)
    p.on_ping_req(PingReq(1, "b", addr(2), "a", addr(1), True), "a", ("10.9.9.9", 1), 1.0)
    assert sent(p.ctx) == [] and p.relays == {}
    assert p.ctx.counters["dropped_unknown_addr"] == 3


def test_relays_are_bounded() -> None:
    p, _ = make("a", "b")
    for i in range(MAX_RELAYS + 5):
        p.on_ping_req(PingReq(i, "b", addr(2), "a", addr(1), True), "a", addr(1), 1.0)
    assert len(p.relays) == MAX_RELAYS + 1
    assert p.ctx.counters["dropped_busy"] == 4


def test_unreachable_hint_hastens_only_the_indirect_step() -> None:
    p, suspected = make("a", "b", "c")
    now = start(p)
    assert p.probe is not None
    target = p.ctx.table.get(p.probe.target)
    assert target is not None
    p.hint_unreachable(("10.9.9.9", 1), now)
    assert p.probe.direct_deadline > now
    p.hint_unreachable(target.addr, now)
    assert p.probe.direct_deadline == now and suspected == []


def test_a_leaving_node_stops_probing() -> None:
    p, _ = make("a")
    p.ctx.leaving = True
    p.tick(p.next_probe)
    assert p.probe is None and sent(p.ctx) == []


steps = st.lists(
    st.tuples(st.sampled_from(["tick", "ack", "nack", "hint", "relay"]), st.floats(0, 0.3)),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(steps)
def test_awareness_stays_bounded_and_timers_always_move_forward(
    seq: list[tuple[str, float]],
) -> None:
    p, _ = make("a", "b", "c", "d")
    now = 0.0
    for i, (what, dt) in enumerate(seq):
        now += dt
        seq_no = p.probe.seq if p.probe is not None else i
        if what == "ack":
            p.on_ack(seq_no, now)
        elif what == "nack":
            p.on_nack(seq_no, now)
        elif what == "hint":
            p.hint_unreachable(addr(1 + i % 4), now)
        elif what == "relay":
            p.on_ping_req(PingReq(i, "b", addr(2), "a", addr(1), True), "a", addr(1), now)
        p.tick(now)
        assert 0 <= p.ctx.awareness.score < T.awareness_max_multiplier
        assert now < p.next_deadline(math.inf) < math.inf  # nothing due is left undone
        p.ctx.out.clear()


def test_a_peers_suspicion_is_confirmed_by_probing_now_not_at_the_next_period() -> None:
    p, _ = make("a", "b", "c")
    start(p)
    probe = p.probe
    assert probe is not None
    p.on_ack(probe.seq, probe.direct_deadline - 0.01)  # answered: nothing left to learn
    node = p.ctx.table.get("c" if probe.target != "c" else "b")
    assert node is not None
    node.state = State.SUSPECT
    p.ctx.table.changed()
    now = probe.direct_deadline
    p.confirm_now(node.name, now)  # a peer told us it suspects node (Lifeguard dogpile)
    assert p.next_deadline(99.0) <= now
    sent(p.ctx)
    p.tick(now)
    assert p.probe is not None and p.probe.target == node.name and p.probe.seq != probe.seq
    [(_, msgs)] = sent(p.ctx)
    assert Suspect(node.incarnation, node.name, "x") in msgs  # with the suspicion attached


def test_a_probe_in_flight_is_not_cut_short_by_a_peers_suspicion() -> None:
    p, _ = make("a", "b", "c")
    start(p)
    probe = p.probe
    assert probe is not None
    other = "c" if probe.target != "c" else "b"
    node = p.ctx.table.get(other)
    assert node is not None
    node.state = State.SUSPECT
    p.confirm_now(other, probe.direct_deadline - 0.01)
    # unanswered: it runs to its end, then the suspect is probed at once
    assert p.next_deadline(99.0) == probe.direct_deadline
    p.tick(probe.end)
    assert p.probe is not None and p.probe.target == other


def test_when_every_helper_nacks_the_probe_ends_without_waiting_for_the_period() -> None:
    p, suspected = make("a", "b", "c")
    start(p)
    probe = p.probe
    assert probe is not None
    p.tick(probe.direct_deadline)
    assert probe.indirect_sent and probe.expected_nacks == 2
    p.on_nack(probe.seq, probe.direct_deadline + 0.03)
    assert probe.end > probe.direct_deadline + 0.03  # one helper still may reach it
    p.on_nack(probe.seq, probe.direct_deadline + 0.04)
    assert probe.end == probe.direct_deadline + 0.04
    p.tick(probe.end)
    assert [s.name for s in suspected] == [probe.target]


def test_an_answered_probe_marks_the_targets_last_ack() -> None:
    p, _ = make("a")
    start(p)
    probe = p.probe
    assert probe is not None
    p.on_ack(probe.seq, 0.123)
    assert p.ctx.marks[probe.target]["ack"] == 0.123
