"""The protocol object driven by hand: rules, drops by reason, robustness (hypothesis)."""

from __future__ import annotations

import itertools
import random

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from duravip.config.model import PRESETS
from duravip.swim import codec
from duravip.swim.core import StreamRequest, Swim
from duravip.swim.crypto import Boot, Keyring
from duravip.swim.members import State

KEY = Keyring([b"0123456789abcdef0123456789abcdef"])
#: the sealing identity of hand-made packets ("y", a node the tests' subjects never met)
BOOT = Boot.fresh(1)


def seal(plain: bytes, cluster: str = "c", channel: bytes = b"udp", ring: Keyring = KEY) -> bytes:
    return ring.seal(plain, cluster, channel, BOOT)


def packet(*msgs: codec.Message, sender: str = "y", dest: str = "x") -> bytes:
    return codec.encode_packet([codec.encode_message(m) for m in msgs], sender, dest)


T = attrs.evolve(PRESETS["lan"], push_pull_interval=1000.0)


class Net:
    """Instant, lossless delivery between Swim objects; drops packets to ``down`` nodes."""

    def __init__(self) -> None:
        self.nodes: dict[tuple[str, int], Swim] = {}
        self.down: set[str] = set()
        self.now = 0.0
        self.captured: list[tuple[bytes, tuple[str, int]]] = []

    def add(self, name: str, seeds: tuple[tuple[str, int], ...] = (), meta: bytes = b"") -> Swim:
        addr = (f"10.0.0.{len(self.nodes) + 1}", 4801)
        s = Swim(
            name=name,
            addr=addr,
            cluster="c",
            timers=T,
            keyring=KEY,
            seeds=seeds,
            meta=meta,
            rng=random.Random(len(self.nodes)),
            now=self.now,
        )
        self.nodes[addr] = s
        return s

    def pump(self, rounds: int = 50) -> None:
        for _ in range(rounds):
            moved = False
            for src in list(self.nodes.values()):
                if src.name in self.down:
                    src.outgoing()
                    src.stream_requests()
                    continue
                for data, addr in src.outgoing():
                    moved = True
                    self.captured.append((data, addr))
                    dst = self.nodes.get(addr)
                    if dst is not None and dst.name not in self.down:
                        dst.receive_datagram(data, src.addr, self.now)
                for req in src.stream_requests():
                    moved = True
                    dst = self.nodes.get(req.addr)
                    resp = None
                    if dst is not None and dst.name not in self.down:
                        resp = dst.handle_stream(req.data, src.addr, self.now) or None
                    src.stream_response(req, resp, self.now)
            if not moved:
                return

    def run(self, seconds: float, step: float = 0.01) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            for s in self.nodes.values():
                if s.name not in self.down:
                    s.tick(self.now)
            self.pump()


def state(s: Swim, name: str) -> State | None:
    m = s.members().get(name)
    return None if m is None else m.state


def cluster(n: int, meta: bytes = b"") -> tuple[Net, list[Swim]]:
    net = Net()
    first = net.add("n0", meta=meta)
    nodes = [first] + [net.add(f"n{i}", seeds=(first.addr,), meta=meta) for i in range(1, n)]
    net.pump()
    net.run(3.0)
    return net, nodes


def test_join_through_seed_and_meta_fetch() -> None:
    net, nodes = cluster(3, meta=b"hello")
    for s in nodes:
        assert {m.name: m.state for m in s.members().values()} == dict.fromkeys(
            ("n0", "n1", "n2"), State.ALIVE
        )
        assert all(m.meta == b"hello" and m.meta_current for m in s.members().values())
    nodes[1].set_meta(b"v" * 150_000, net.now)
    net.run(1.0)
    for s in nodes:
        m = s.members()["n1"]
        assert m.meta == b"v" * 150_000 and m.meta_version == 1 and m.meta_current
    assert nodes[0].counters["meta_fetched"] >= 1


def test_crash_suspect_then_dead_then_forgotten() -> None:
    net, nodes = cluster(4)
    net.down.add("n3")
    net.run(T.probe_interval * 8)
    seen = {state(s, "n3") for s in nodes[:3]}
    assert seen <= {State.SUSPECT, State.DEAD}
    net.run(10.0)
    assert all(state(s, "n3") == State.DEAD for s in nodes[:3])
    assert (
        nodes[0].counters["declared_dead"]
        + nodes[1].counters["declared_dead"]
        + nodes[2].counters["declared_dead"]
        >= 1
    )
    net.run(T.gossip_to_the_dead_time + 1)
    assert all("n3" not in s.members() for s in nodes[:3])
    assert "n3" in nodes[0].table.tombstones


def test_refutation_with_higher_incarnation() -> None:
    net, nodes = cluster(3)
    victim = nodes[2]
    inc = victim.members()["n2"].incarnation
    nodes[0]._transitions.on_suspect(codec.Suspect(inc, "n2", "n0"), net.now)  # a false suspicion
    assert state(nodes[0], "n2") == State.SUSPECT
    net.pump()
    assert victim.members()["n2"].incarnation == inc + 1
    assert victim.counters["refutes"] == 1
    assert all(state(s, "n2") == State.ALIVE for s in nodes)
    net.run(10.0)
    assert all(state(s, "n2") == State.ALIVE for s in nodes)


def test_indirect_probe_with_nack_and_awareness() -> None:
    net, nodes = cluster(3)
    a = nodes[0]
    # a cannot reach n1 directly but n2 can: the indirect probe succeeds, no suspicion
    orig = net.pump

    def lossy_pump(rounds: int = 50) -> None:
        for data, addr in a.outgoing():
            dst = net.nodes[addr]
            plain = codec.decode_packet(KEY.open(data, "c", b"udp").plaintext).messages
            if dst.name == "n1" and any(isinstance(m, codec.Ping) for m in plain):
                continue
            dst.receive_datagram(data, a.addr, net.now)
        orig(rounds)

    net.pump = lossy_pump  # type: ignore[method-assign]
    net.run(5.0)
    assert a.counters["ping_reqs_sent"] >= 1
    assert state(a, "n1") == State.ALIVE
    assert a.awareness.score == 0  # acks came back (through the helper)


def test_nack_counted_when_target_is_down() -> None:
    net, nodes = cluster(3)
    net.down.add("n2")
    net.run(4.0)
    assert nodes[1].counters["nacks_sent"] >= 1 or nodes[0].counters["nacks_sent"] >= 1
    assert nodes[0].counters["nacks_recv"] + nodes[1].counters["nacks_recv"] >= 1


def test_graceful_leave_marks_left_at_once() -> None:
    net, nodes = cluster(3)
    nodes[2].leave(net.now)
    net.pump()
    assert state(nodes[0], "n2") == State.LEFT and state(nodes[1], "n2") == State.LEFT
    net.run(1.0)
    assert nodes[2].left_done()
    assert nodes[0].counters["suspected"] == 0


def test_restart_with_same_name_rejoins_with_higher_incarnation() -> None:
    net, nodes = cluster(3)
    net.down.add("n2")
    net.run(10.0)
    assert state(nodes[0], "n2") == State.DEAD
    old_inc = nodes[0].members()["n2"].incarnation
    # fresh process, same name and address, incarnation 0
    addr = nodes[2].addr
    del net.nodes[addr]
    net.down.discard("n2")
    fresh = Swim(
        name="n2",
        addr=addr,
        cluster="c",
        timers=T,
        keyring=KEY,
        seeds=(nodes[0].addr,),
        now=net.now,
    )
    net.nodes[addr] = fresh
    net.pump()
    net.run(2.0)
    assert fresh.members()["n2"].incarnation > old_inc
    assert all(state(s, "n2") == State.ALIVE for s in (nodes[0], nodes[1], fresh))
    assert state(fresh, "n1") == State.ALIVE


def test_lonely_node_retries_seeds_with_capped_backoff() -> None:
    net = Net()
    lonely = net.add("a", seeds=(("10.9.9.9", 4801),))
    times = []
    for _ in range(10_000):
        if net.now > 25.0:
            break
        for r in lonely.stream_requests():
            times.append(net.now)
            lonely.stream_response(r, None, net.now)
        net.now = max(net.now + 0.01, lonely.next_deadline())
        lonely.tick(net.now)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) >= 8
    assert max(gaps) <= 4.0 + 1e-9 and gaps[-1] >= 2.0


def test_drops_are_counted_by_reason() -> None:
    net, nodes = cluster(2)
    a, b = nodes
    pkt = packet(codec.Ping(1, "n1", "n0", a.addr), sender="n0", dest="n1")
    b.receive_datagram(seal(pkt, ring=Keyring.generate()), a.addr, net.now)
    b.receive_datagram(seal(pkt, "other"), a.addr, net.now)
    b.receive_datagram(seal(b"\x02\x01garbage"), a.addr, net.now)
    b.receive_datagram(b"\x00" * 5, a.addr, net.now)
    assert b.counters["dropped_decrypt"] == 2
    assert b.counters["dropped_cluster"] == 1
    assert b.counters["dropped_parse"] == 1
    assert b.handle_stream(b"junk", a.addr, net.now) == b""
    assert b.counters["dropped_stream_decrypt"] == 1


def test_replayed_packets_are_harmless() -> None:
    net, nodes = cluster(3)
    # record everything (including a suspicion, its refutation and a leave) ...
    nodes[0]._transitions.on_suspect(codec.Suspect(nodes[2].local.incarnation, "n2", "n0"), net.now)
    net.pump()
    net.run(3.0)
    nodes[1].leave(net.now)
    net.pump()
    net.run(1.0)
    before = {
        s.name: {m.name: (m.state, m.incarnation) for m in s.members().values()} for s in nodes
    }
    # ... and replay it all, twice
    for data, addr in list(net.captured) * 2:
        dst = net.nodes.get(addr)
        if dst is not None:
            dst.receive_datagram(data, ("10.0.0.99", 1), net.now)
    for s in nodes:
        s.outgoing()
        s.events()
    after = {
        s.name: {m.name: (m.state, m.incarnation) for m in s.members().values()} for s in nodes
    }
    assert after == before


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=st.binary(max_size=400), stream=st.binary(max_size=400))
def test_arbitrary_bytes_never_raise(data: bytes, stream: bytes) -> None:
    s = Swim(name="x", addr=("10.0.0.1", 1), cluster="c", timers=T, keyring=KEY, now=0.0)
    s.receive_datagram(data, ("10.0.0.2", 1), 1.0)
    # also as a well-encrypted payload, to reach the codec
    s.receive_datagram(seal(data), ("10.0.0.2", 1), 1.0)
    assert s.handle_stream(stream, ("10.0.0.2", 1), 1.0) == b""
    s.handle_stream(seal(stream, channel=b"tcp"), ("10.0.0.2", 1), 1.0)
    s.stream_response(StreamRequest(1, "join", ("10.0.0.2", 1), b"", 1.0), stream, 1.0)
    s.tick(2.0)


VALID = [
    packet(m)
    for m in (
        codec.Ping(1, "x", "y", ("10.0.0.2", 1)),
        codec.Alive(3, "y", ("10.0.0.2", 1), 1, 5, 10),
        codec.Suspect(0, "x", "y"),
        codec.Dead(0, "y", "y"),
        codec.PingReq(2, "z", ("10.0.0.3", 1), "y", ("10.0.0.2", 1), True),
    )
]


@settings(max_examples=300, deadline=None)
@given(
    idx=st.integers(0, len(VALID) - 1),
    flips=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 200),
)
def test_mutated_valid_packets_never_raise(
    idx: int, flips: list[tuple[int, int]], cut: int
) -> None:
    s = Swim(name="x", addr=("10.0.0.1", 1), cluster="c", timers=T, keyring=KEY, now=0.0)
    raw = bytearray(VALID[idx])
    for pos, val in flips:
        if pos < len(raw):
            raw[pos] = val
    pkt = bytes(raw[: max(1, cut)] if cut < len(raw) else raw)
    s.receive_datagram(seal(pkt), ("10.0.0.2", 1), 1.0)
    sealed = bytearray(seal(VALID[idx]))
    for pos, val in flips:
        if pos < len(sealed):
            sealed[pos] = val
    s.receive_datagram(bytes(sealed), ("10.0.0.2", 1), 1.0)
    s.tick(5.0)
    s.outgoing()
    assert s.members()["x"].state == State.ALIVE  # nothing makes it think itself dead


def test_unreachable_hint_only_hastens_indirect_probe() -> None:
    net, nodes = cluster(3)
    a = nodes[0]
    net.down.add("n1")
    net.down.add("n2")  # nobody answers: we look at a's own outputs only
    # advance to the start of a's next probe
    first = a._probes.probe.seq if a._probes.probe is not None else None
    while a._probes.probe is None or a._probes.probe.seq == first:
        net.now = a.next_deadline()
        a.tick(net.now)
    p = a._probes.probe
    target = a.table.get(p.target)
    assert target is not None
    a.outgoing()
    sent_before = a.counters["ping_reqs_sent"]
    a.hint_unreachable(target.addr, net.now)
    a.tick(net.now)
    assert a.counters["ping_reqs_sent"] > sent_before  # indirect probes went out at once
    assert state(a, p.target) == State.ALIVE  # but the hint alone never suspects
    a.hint_unreachable(("10.9.9.9", 1), net.now)  # unrelated address: ignored
    assert a.counters["unreachable_hints"] == 1


def test_set_meta_while_leaving_does_not_cancel_the_leave() -> None:
    net, nodes = cluster(3)
    nodes[2].leave(net.now)
    nodes[2].set_meta(b"late", net.now)
    net.pump()
    net.run(1.0)
    assert state(nodes[0], "n2") == State.LEFT


NAMES = st.sampled_from(["x", "y", "z"])
ADDRS = st.sampled_from([("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)])
INCS = st.integers(0, 6)
VALID_MSG = st.one_of(
    st.builds(codec.Ping, st.integers(0, 5), NAMES, NAMES, ADDRS),
    st.builds(codec.PingReq, st.integers(0, 5), NAMES, ADDRS, NAMES, ADDRS, st.booleans()),
    st.builds(codec.Ack, st.integers(0, 5)),
    st.builds(codec.Nack, st.integers(0, 5)),
    st.builds(
        codec.Alive, INCS, NAMES, ADDRS, st.integers(0, 3), st.integers(0, 3), st.integers(0, 9)
    ),
    st.builds(codec.Suspect, INCS, NAMES, NAMES),
    st.builds(codec.Dead, INCS, NAMES, NAMES),
)


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.lists(VALID_MSG, min_size=1, max_size=4), st.floats(0, 2)), max_size=25
    )
)
def test_any_sequence_of_valid_messages_keeps_invariants(
    steps: list[tuple[list[codec.Message], float]],
) -> None:
    """Well-formed but adversarial traffic: never raises, self stays alive, incarnations only grow."""
    s = Swim(name="x", addr=("10.0.0.1", 1), cluster="c", timers=T, keyring=KEY, now=0.0)
    now = 0.0
    seen: dict[str, int] = {}
    for msgs, dt in steps:
        now += dt
        s.receive_datagram(seal(packet(*msgs)), ("10.0.0.2", 1), now)
        s.tick(now)
        s.outgoing()
        for r in s.stream_requests():
            s.stream_response(r, None, now)
        assert s.members()["x"].state == State.ALIVE
        for m in s.members().values():
            assert m.incarnation >= seen.get(m.name, 0)
            seen[m.name] = m.incarnation
        assert s.next_deadline() > now  # every due timer ran: no spin


def test_join_in_flight_does_not_spin() -> None:
    """Seeds that never answer (partition): the timers still move forward."""
    net = Net()
    lonely = net.add("a", seeds=(("10.9.9.9", 4801),))
    pending = lonely.stream_requests()
    assert pending
    for _ in range(100):
        before = net.now
        net.now = max(net.now, lonely.next_deadline())
        lonely.tick(net.now)
        lonely.outgoing()
        pending += lonely.stream_requests()
        assert lonely.next_deadline() > net.now >= before
    assert net.now > 1.0
