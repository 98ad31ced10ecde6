"""Hostile input to SWIM membership gossip (issue 17): overflow, resource caps, replay, nonces."""

from __future__ import annotations

import contextlib
import random
import socket
import tracemalloc

import attrs
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from duravip.config.model import PRESETS
from duravip.sim import Simulation
from duravip.swim import codec
from duravip.swim.core import StreamRequest, Swim
from duravip.swim.crypto import HEADER_LEN, Boot, Keyring
from duravip.swim.driver import MembershipService, serve
from duravip.swim.members import State
from duravip.swim.replay import WINDOW, ReplayGuard

KEY = Keyring([b"0123456789abcdef0123456789abcdef"])
T = attrs.evolve(PRESETS["lan"], push_pull_interval=1000.0)
U64 = (1 << 64) - 1
X_ADDR = ("10.0.0.1", 1)
Y_ADDR = ("10.0.0.2", 1)


def node(name: str, addr: tuple[str, int], seed: int = 0) -> Swim:
    return Swim(
        name=name,
        addr=addr,
        cluster="c",
        timers=T,
        keyring=KEY,
        rng=random.Random(seed),
        now=0.0,
        epoch=10**15,  # a boot epoch (the driver uses the wall clock in ns)
    )


def pair() -> tuple[Swim, Swim]:
    """x and y, each knowing the other (as after a join)."""
    x, y = node("x", X_ADDR, 1), node("y", Y_ADDR, 2)
    x.merge_state(y.state_records(), 0.0)
    y.merge_state(x.state_records(), 0.0)
    for s in (x, y):
        s.outgoing()
        s.events()
        s.stream_requests()
        s.reset_broadcasts()
    return x, y


def sealed_from(sender: Swim, dest: str, msgs: list[codec.Message]) -> bytes:
    """A datagram ``sender`` could have sent to ``dest``: properly sealed with the real key."""
    parts = [codec.encode_message(m) for m in msgs]
    return sender.seal_packet(parts, dest)


# ----------------------------------------------------------------------------- 1. overflow


@pytest.mark.parametrize(
    "msg",
    [
        codec.Suspect(U64, "x", "y"),
        codec.Dead(U64, "x", "y"),
        codec.Alive(U64, "x", X_ADDR, 0, 0, 0),
        codec.Alive(1, "x", X_ADDR, U64, 0, 0),
    ],
)
def test_out_of_range_incarnation_about_self_is_dropped(msg: codec.Message) -> None:
    x, y = pair()
    x.receive_datagram(sealed_from(y, "x", [msg]), Y_ADDR, 1.0)
    x.tick(1.5)
    x.outgoing()  # every datagram it wants to send is encodable
    assert x.counters["dropped_range"] == 1
    assert x.local.incarnation < 1 << 63 and x.local.meta_version < 1 << 63
    assert x.members()["x"].state == State.ALIVE


def test_out_of_range_incarnation_about_peer_is_not_kept() -> None:
    x, y = pair()
    z = node("z", ("10.0.0.3", 1), 3)
    x.merge_state(z.state_records(), 0.0)
    x.receive_datagram(sealed_from(y, "x", [codec.Alive(U64, "z", z.addr, 0, 0, 0)]), Y_ADDR, 1.0)
    assert x.members()["z"].incarnation == 0
    assert x.counters["dropped_range"] == 1


def test_largest_accepted_incarnation_saturates() -> None:
    """The largest value that decodes must not make the refutation unencodable either."""
    x, y = pair()
    top = codec.MAX_INCARNATION
    x.receive_datagram(sealed_from(y, "x", [codec.Suspect(top, "x", "y")]), Y_ADDR, 1.0)
    x.receive_datagram(
        sealed_from(y, "x", [codec.Alive(top, "x", ("9.9.9.9", 1), top, 1, 1)]), Y_ADDR, 1.1
    )
    x.set_meta(b"v", 1.2)
    out = x.outgoing()
    assert x.local.incarnation == top and x.local.meta_version == top
    for data, _ in out:  # a peer can read them back
        y.receive_datagram(data, X_ADDR, 1.3)
    assert y.counters["dropped_range"] == 0 and y.counters["dropped_parse"] == 0


def test_push_pull_with_out_of_range_records_is_dropped() -> None:
    x, y = pair()
    rec = codec.NodeRecord("x", X_ADDR, U64, 1, 0, 0, 0)
    req = y.seal_stream(codec.encode_stream(codec.PushPull(False, (rec,))))
    assert x.handle_stream(req, Y_ADDR, 1.0) == b""
    assert x.counters["dropped_stream_range"] == 1
    assert x.local.incarnation == 0


#: small values, values near the top of the wire range, anything
U64S = st.one_of(st.integers(0, 8), st.integers(U64 - 4, U64), st.integers(0, U64))
U32S = st.integers(0, (1 << 32) - 1)
NAME = st.sampled_from(["x", "y", "z", "w"])
ADDR = st.sampled_from([X_ADDR, Y_ADDR, ("10.0.0.3", 1), ("6.6.6.6", 6)])
ANY_MSG = st.one_of(
    st.builds(codec.Ping, U32S, NAME, NAME, ADDR),
    st.builds(codec.PingReq, U32S, NAME, ADDR, NAME, ADDR, st.booleans()),
    st.builds(codec.Ack, U32S),
    st.builds(codec.Nack, U32S),
    st.builds(codec.Alive, U64S, NAME, ADDR, U64S, U64S, U32S),
    st.builds(codec.Suspect, U64S, NAME, NAME),
    st.builds(codec.Dead, U64S, NAME, NAME),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    raw=st.binary(max_size=300),
    plain=st.binary(max_size=300),
    msgs=st.lists(ANY_MSG, min_size=1, max_size=5),
    records=st.lists(
        st.builds(codec.NodeRecord, NAME, ADDR, U64S, st.integers(0, 3), U64S, U64S, U32S),
        max_size=4,
    ),
)
def test_arbitrary_and_validly_sealed_input_never_raises(
    raw: bytes, plain: bytes, msgs: list[codec.Message], records: list[codec.NodeRecord]
) -> None:
    x, y = pair()
    x.receive_datagram(raw, Y_ADDR, 1.0)
    x.receive_datagram(y.seal_packet([plain], "x"), Y_ADDR, 1.0)
    x.receive_datagram(y.seal_raw_datagram(plain), Y_ADDR, 1.0)
    x.receive_datagram(sealed_from(y, "x", msgs), Y_ADDR, 1.1)
    x.handle_stream(raw, Y_ADDR, 1.2)
    x.handle_stream(y.seal_stream(plain), Y_ADDR, 1.2)
    x.handle_stream(
        y.seal_stream(codec.encode_stream(codec.PushPull(True, tuple(records)))), Y_ADDR, 1.2
    )
    x.stream_response(StreamRequest(1, "join", Y_ADDR, b"", 1.0), y.seal_stream(plain), 1.3)
    for t in (1.5, 3.0, 6.0):
        x.tick(t)
        x.outgoing()
        for r in x.stream_requests():
            x.stream_response(r, None, t)
    assert x.members()["x"].state == State.ALIVE


# ----------------------------------------------------------------------------- 3. replay


def test_replayed_ping_from_another_address_gets_no_answer() -> None:
    x, y = pair()
    ping = sealed_from(y, "x", [codec.Ping(7, "x", "y", Y_ADDR)])
    x.receive_datagram(ping, Y_ADDR, 1.0)
    assert [a for _, a in x.outgoing()] == [Y_ADDR]  # the genuine one is answered
    x._ctx.broadcast_alive(x.local)  # something worth gossiping
    for i in range(20):
        x.receive_datagram(ping, ("6.6.6.6", 6), 1.0 + i * 0.005)
        x.receive_datagram(ping, Y_ADDR, 1.0 + i * 0.005)  # even from the right address
    assert x.outgoing() == []
    assert x.counters["dropped_replay"] == 20
    assert x.counters["dropped_unknown_addr"] == 20
    assert x.broadcasts.pending("x") is not None  # no transmit spent


def test_ping_from_wrong_address_is_not_answered() -> None:
    x, y = pair()
    x.receive_datagram(sealed_from(y, "x", [codec.Ping(7, "x", "y", Y_ADDR)]), ("6.6.6.6", 6), 1.0)
    assert x.outgoing() == []
    assert x.counters["dropped_unknown_addr"] == 1


def test_ping_req_to_an_unknown_address_is_refused() -> None:
    x, y = pair()
    req = codec.PingReq(3, "y", ("6.6.6.6", 6), "y", Y_ADDR, True)
    x.receive_datagram(sealed_from(y, "x", [req]), Y_ADDR, 1.0)
    req2 = codec.PingReq(4, "nobody", ("6.6.6.7", 6), "y", Y_ADDR, True)
    x.receive_datagram(sealed_from(y, "x", [req2]), Y_ADDR, 1.1)
    x.tick(1.5)
    assert all(a == Y_ADDR for _, a in x.outgoing())
    assert x.counters["dropped_unknown_addr"] == 2


def test_packet_for_another_node_is_dropped() -> None:
    x, y = pair()
    x.receive_datagram(sealed_from(y, "z", [codec.Ping(7, "x", "y", Y_ADDR)]), Y_ADDR, 1.0)
    assert x.outgoing() == []
    assert x.counters["dropped_misdirected"] == 1


def test_restarted_sender_is_accepted_and_its_old_packets_are_not() -> None:
    x, y = pair()
    old = sealed_from(y, "x", [codec.Ping(1, "x", "y", Y_ADDR)])
    x.receive_datagram(old, Y_ADDR, 1.0)
    x.outgoing()
    y2 = Swim(
        name="y",
        addr=Y_ADDR,
        cluster="c",
        timers=T,
        keyring=KEY,
        rng=random.Random(9),
        now=2.0,
        epoch=y.epoch + 1,
    )
    x.receive_datagram(sealed_from(y2, "x", [codec.Ping(1, "x", "y", Y_ADDR)]), Y_ADDR, 2.0)
    assert [a for _, a in x.outgoing()] == [Y_ADDR]
    x.receive_datagram(old, Y_ADDR, 2.1)
    older = sealed_from(y, "x", [codec.Ping(2, "x", "y", Y_ADDR)])  # a later packet of the old boot
    x.receive_datagram(older, Y_ADDR, 2.2)
    assert x.outgoing() == []
    assert x.counters["dropped_replay"] == 2


def _detection(sim: Simulation) -> float:
    (k,) = sim.kills
    assert k.done is not None
    return k.done - k.time


async def _run_kill(seed: int, attack: bool) -> tuple[float, Simulation]:
    sim = Simulation(timers=PRESETS["lan"], seed=seed)
    sim.add_cluster(8)
    if attack:
        sim.add_attacker(interval=0.005, seed=seed)
    await sim.run_for(3)
    sim.kill("n5")
    await sim.run_for(5)
    return _detection(sim), sim


REPLAY_SEEDS = (1, 2, 3, 4, 5)


async def test_replaying_attacker_changes_neither_detection_nor_targets(
    autojump_clock: object,
) -> None:
    with trio.fail_after(600):  # virtual seconds
        for seed in REPLAY_SEEDS:
            base, _ = await _run_kill(seed, attack=False)
            hit, sim = await _run_kill(seed, attack=True)
            assert sim.attackers[0].sent > 1000
            assert not sim.sent_to_unknown, sim.sent_to_unknown[:3]
            assert abs(hit - base) <= 0.10 * base, (seed, base, hit)
            assert sum(nd.swim.counters["dropped_replay"] for nd in sim.nodes.values()) > 0
            assert not sim.false_dead


# ----------------------------------------------------------------------------- 2. TCP caps


def free_port() -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port: int = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


TCP_TIMERS = attrs.evolve(PRESETS["fast"], push_pull_interval=1.0)
ATTACK_CONNS = 100
ATTACK_BYTES = 2 * 1024 * 1024  # each connection tries to push this much before the key is proven


async def _attack_conn(port: int, sent: list[int]) -> None:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return
    try:
        await stream.send_all((32 * 1024 * 1024).to_bytes(4, "big"))
        chunk = b"\xa5" * 65536
        for _ in range(ATTACK_BYTES // len(chunk)):
            await stream.send_all(chunk)
            sent[0] += len(chunk)
        for _ in range(5):  # then trickle
            await stream.send_all(b"\x00")
            await trio.sleep(0.05)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        with trio.move_on_after(1) as cs:
            cs.shield = True
            await stream.aclose()


async def test_unauthenticated_tcp_flood_stays_bounded_and_node_keeps_working() -> None:
    key = Keyring.generate()
    pa, pb = free_port(), free_port()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            a: MembershipService = await nursery.start(
                lambda task_status: serve(
                    name="a",
                    bind=("127.0.0.1", pa),
                    cluster="t",
                    timers=TCP_TIMERS,
                    keyring=key,
                    task_status=task_status,
                )
            )
            b: MembershipService = await nursery.start(
                lambda task_status: serve(
                    name="b",
                    bind=("127.0.0.1", pb),
                    cluster="t",
                    timers=TCP_TIMERS,
                    keyring=key,
                    seeds=[("127.0.0.1", pa)],
                    task_status=task_status,
                )
            )
            with trio.fail_after(10):
                await a.snapshot.wait_value(lambda m: "b" in m.members)
            tracemalloc.start()
            try:
                base, _ = tracemalloc.get_traced_memory()
                sent = [0]
                with trio.move_on_after(15):
                    async with trio.open_nursery() as attack:
                        for _ in range(ATTACK_CONNS):
                            attack.start_soon(_attack_conn, pa, sent)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            growth = peak - base
            print(f"tracemalloc growth under {ATTACK_CONNS} connections: {growth / 2**20:.1f} MiB")
            assert growth < 64 * 2**20
            assert sent[0] < ATTACK_CONNS * ATTACK_BYTES // 4  # they were cut off early
            assert a.counters["dropped_stream_busy"] > 0 or a.counters["stream_errors"] > 0
            # the node still serves real peers: a view change reaches b over TCP
            a.set_meta(b"after the flood")
            with trio.fail_after(10):
                await b.snapshot.wait_value(
                    lambda m: (
                        m.members["a"].meta == b"after the flood"
                        and m.members["a"].state == State.ALIVE
                    )
                )
            nursery.cancel_scope.cancel()


async def test_slow_header_frame_is_cut_and_excess_connections_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from duravip.swim import driver

    monkeypatch.setattr(driver, "HEADER_TIMEOUT", 0.3)
    monkeypatch.setattr(driver, "MAX_INBOUND_STREAMS", 6)
    monkeypatch.setattr(driver, "MAX_INBOUND_PER_IP", 4)
    key = Keyring.generate()
    port = free_port()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            a: MembershipService = await nursery.start(
                lambda task_status: serve(
                    name="a",
                    bind=("127.0.0.1", port),
                    cluster="t",
                    timers=TCP_TIMERS,
                    keyring=key,
                    task_status=task_status,
                )
            )
            streams = []
            try:
                for _ in range(6):
                    s = await trio.open_tcp_stream("127.0.0.1", port)
                    streams.append(s)
                    await s.send_all((100).to_bytes(4, "big") + b"x")  # a small, slow header
                await trio.sleep(0.1)
                assert a.counters["dropped_stream_busy"] == 2  # 5th and 6th closed at once
                with trio.fail_after(3):  # the slow ones are cut after the header deadline
                    for s in streams[:4]:
                        with contextlib.suppress(trio.BrokenResourceError):
                            while await s.receive_some(100):
                                pass
                assert a.counters["stream_errors"] == 4
            finally:
                for s in streams:
                    await trio.aclose_forcefully(s)
            nursery.cancel_scope.cancel()


def test_restart_with_a_clock_stepped_back_is_accepted_once_declared_dead() -> None:
    x, y = pair()
    x.receive_datagram(sealed_from(y, "x", [codec.Ping(1, "x", "y", Y_ADDR)]), Y_ADDR, 1.0)
    x.outgoing()
    y2 = Swim(
        name="y",
        addr=Y_ADDR,
        cluster="c",
        timers=T,
        keyring=KEY,
        rng=random.Random(9),
        now=2.0,
        epoch=y.epoch - 10**9,
    )
    x.receive_datagram(sealed_from(y2, "x", [codec.Ping(1, "x", "y", Y_ADDR)]), Y_ADDR, 2.0)
    assert x.outgoing() == [] and x.counters["dropped_replay"] == 1
    x._transitions.on_dead(codec.Dead(0, "y", "x"), 2.1)  # its old boot is declared dead
    x.receive_datagram(sealed_from(y2, "x", [codec.Ping(2, "x", "y", Y_ADDR)]), Y_ADDR, 2.2)
    assert [a for _, a in x.outgoing()] == [Y_ADDR]


# ----------------------------------------------------------------------------- 4. nonces


def test_nonces_are_per_boot_counters_not_random() -> None:
    """No random 96-bit nonce (2^32 bound per key): a per-boot sub-key and its frame counter."""
    ring = Keyring.generate()
    a, b = Boot(5, b"\x00" * 8), Boot(5, b"\x00" * 7 + b"\x01")
    frames = [ring.seal(b"same", "c", b"udp", a) for _ in range(1000)]
    assert [ring.open(f, "c", b"udp").counter for f in frames] == list(range(1, 1001))
    assert ring.sealed == 1000
    # the same counter in another boot is sealed under another sub-key
    other = ring.seal(b"same", "c", b"udp", b)
    assert ring.open(other, "c", b"udp").counter == 1
    assert other[HEADER_LEN:] != frames[0][HEADER_LEN:]
    # the counter survives a key rotation (set_keyring): receivers' windows keep working
    ring2 = Keyring([*Keyring.generate().keys, *ring.keys])
    assert ring2.open(ring2.seal(b"x", "c", b"udp", a), "c", b"udp").counter == 1001


def test_replay_window_edges() -> None:
    g = ReplayGuard(max_senders=2)
    salt = b"s" * 8
    assert g.accept("a", 1, salt, 10)
    assert not g.accept("a", 1, salt, 10)
    assert g.accept("a", 1, salt, 12) and g.accept("a", 1, salt, 11)  # reordered: fine once
    assert g.accept("a", 1, salt, 10 + WINDOW)
    assert not g.accept("a", 1, salt, 11)  # fell out of the window
    assert g.accept("a", 1, salt, (1 << 64) - 1)  # a huge jump costs no memory
    assert not g.accept("a", 1, b"t" * 8, 5)  # same epoch, another salt: not this boot
    assert not g.accept("a", 0, salt, 10**6)  # an older boot
    assert g.accept("a", 2, b"t" * 8, 1)  # a restart
    assert g.accept("b", 1, salt, 1) and g.accept("c", 1, salt, 1)
    assert len(g) == 2  # bounded
