"""Unit tests of the sans-IO helpers: crypto, codec, broadcast queue, awareness, suspicion, table."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from duravip.swim import codec
from duravip.swim.awareness import Awareness
from duravip.swim.broadcast import BroadcastQueue, retransmit_limit
from duravip.swim.crypto import Boot, CryptoError, Keyring
from duravip.swim.members import MemberTable, NodeState, State
from duravip.swim.suspicion import Suspicion, min_timeout

# ---------------------------------------------------------------- crypto


def test_keyring_file_roundtrip(tmp_path: Path) -> None:
    ring = Keyring([b"k" * 16, b"l" * 24, b"m" * 32])
    p = tmp_path / "keyring"
    p.write_text("# comment\n\n" + ring.dumps())
    loaded = Keyring.from_file(p)
    assert loaded == ring
    assert loaded.keys[0] == b"k" * 16
    assert "k" * 16 not in repr(loaded)


@pytest.mark.parametrize(
    "text",
    ["", "# only a comment\n", "not base64!!\n", "AAAA\n"],  # AAAA: 3 bytes
)
def test_keyring_rejects_bad_files(text: str) -> None:
    with pytest.raises(ValueError):
        Keyring.parse(text)


def test_seal_open_and_rotation() -> None:
    old, new = Keyring.generate(), Keyring.generate(16)
    boot = Boot.fresh(1234)
    frame = old.seal(b"hello", "c1", b"udp", boot)
    opened = old.open(frame, "c1", b"udp")
    assert (opened.plaintext, opened.epoch, opened.salt, opened.counter) == (
        b"hello",
        1234,
        boot.salt,
        1,
    )
    assert old.open(old.seal(b"again", "c1", b"udp", boot), "c1", b"udp").counter == 2
    # a ring that has the old key anywhere opens it; one without it does not
    assert Keyring([*new.keys, *old.keys]).open(frame, "c1", b"udp").plaintext == b"hello"
    with pytest.raises(CryptoError) as e:
        new.open(frame, "c1", b"udp")
    assert e.value.reason == "decrypt"
    with pytest.raises(CryptoError) as e:
        old.open(frame, "c2", b"udp")
    assert e.value.reason == "cluster"
    with pytest.raises(CryptoError):  # a UDP frame is no TCP frame
        old.open(frame, "c1", b"tcp")
    # the primary key seals
    both = Keyring([*new.keys, *old.keys])
    assert new.open(both.seal(b"x", "c1", b"udp", boot), "c1", b"udp").plaintext == b"x"
    assert both.sealed == 1 and old.sealed == 2
    # the authenticated header: boot and counter cannot be altered
    tampered = bytearray(frame)
    tampered[10] ^= 1  # a byte of the boot epoch
    with pytest.raises(CryptoError):
        old.open(bytes(tampered), "c1", b"udp")


def test_nonces_never_repeat_across_boots_and_keys() -> None:
    """Same counter, other boot: another sub-key, so the ciphertexts differ."""
    ring = Keyring.generate()
    a, b = Boot(7, b"\x00" * 8), Boot(7, b"\x00" * 7 + b"\x01")
    fa, fb = ring.seal(b"same", "c", b"udp", a), ring.seal(b"same", "c", b"udp", b)
    assert fa[-20:] != fb[-20:]
    assert ring.open(fa, "c", b"udp").salt == a.salt


@given(st.binary(max_size=200))
def test_open_garbage_only_raises_crypto_error(data: bytes) -> None:
    ring = Keyring([b"a" * 32])
    with pytest.raises(CryptoError):
        ring.open(data, "c", b"udp")


# ---------------------------------------------------------------- codec

MSGS = [
    codec.Ping(7, "n2", "n1", ("10.0.0.1", 4801)),
    codec.PingReq(9, "n3", ("10.0.0.3", 4801), "n1", ("10.0.0.1", 4801), True),
    codec.Ack(2**32 - 1),
    codec.Nack(0),
    codec.Alive(2**63 - 1, "nödé", ("10.0.0.1", 65535), 5, 2**64 - 1, 100_000),
    codec.Suspect(3, "n2", "n1"),
    codec.Dead(4, "n2", "n2"),
]


def test_codec_roundtrip_compound() -> None:
    pkt = codec.encode_packet([codec.encode_message(m) for m in MSGS], "n1", "n2")
    assert codec.decode_packet(pkt) == codec.Packet("n1", "n2", MSGS)


def test_stream_roundtrip() -> None:
    rec = codec.NodeRecord("n1", ("10.0.0.1", 1), 3, 2, 4, 5, 6)
    for m in (
        codec.PushPull(True, (rec, rec)),
        codec.MetaRequest("n1", 3, 99),
        codec.MetaResponse("n1", True, 3, 99, b"x" * 200_000),
    ):
        assert codec.decode_stream(codec.encode_stream(m)) == m


def test_codec_rejects_truncation_and_trailing() -> None:
    pkt = codec.encode_packet([codec.encode_message(m) for m in MSGS], "n1", "n2")
    for cut in range(len(pkt)):
        with pytest.raises(codec.CodecError):
            codec.decode_packet(pkt[:cut])
    with pytest.raises(codec.CodecError):
        codec.decode_packet(pkt + b"\x00")


@given(st.binary(max_size=300))
def test_decode_any_bytes(data: bytes) -> None:
    for fn in (codec.decode_packet, codec.decode_stream):
        with contextlib.suppress(codec.CodecError):
            fn(data)


# ---------------------------------------------------------------- broadcast queue


def test_retransmit_limit() -> None:
    assert retransmit_limit(4, 1) == 4
    assert retransmit_limit(4, 10) == 8
    assert retransmit_limit(4, 1000) == 16


def test_broadcast_fewest_sent_first_and_invalidation() -> None:
    q = BroadcastQueue()
    q.queue("a", b"A" * 10)
    q.queue("b", b"B" * 10)
    assert q.get(10, limit=3) == [b"B" * 10]  # newest first among equals
    assert q.get(10, limit=3) == [b"A" * 10]  # then the least sent
    q.queue("a", b"a2" * 5)  # a newer update replaces the old one, transmits reset
    assert q.pending("a") == b"a2" * 5
    assert q.get(100, limit=3) == [b"a2" * 5, b"B" * 10]
    assert len(q) == 2
    for _ in range(2):
        q.get(100, limit=3)
    assert len(q) == 0  # each sent exactly 3 times, then dropped


@given(
    st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(1, 300)), max_size=40),
    st.integers(0, 1400),
)
def test_broadcast_respects_budget(items: list[tuple[str, int]], budget: int) -> None:
    q = BroadcastQueue()
    for k, size in items:
        q.queue(k, b"x" * size)
    out = q.get(budget, limit=4)
    assert sum(len(p) for p in out) <= budget
    assert len(out) <= len({k for k, _ in items})


# ---------------------------------------------------------------- awareness and suspicion


def test_awareness_bounds_and_scale() -> None:
    a = Awareness(3)
    a.apply_delta(-5)
    assert a.score == 0
    a.apply_delta(10)
    assert a.score == 2
    assert a.scale(0.5) == pytest.approx(1.5)


def test_suspicion_timeout_shrinks_with_confirmations() -> None:
    lo = min_timeout(4, 100, 1.0)
    assert lo == pytest.approx(8.0)
    assert min_timeout(4, 1, 1.0) == pytest.approx(4.0)  # floor of 1 for tiny clusters
    s = Suspicion(incarnation=1, sender="a", k=3, min_t=lo, max_t=6 * lo, start=10.0)
    timeouts = [s.timeout()]
    for sender in ("b", "b", "c", "d", "e"):
        s.confirm(sender)
        timeouts.append(s.timeout())
    assert timeouts[0] == pytest.approx(6 * lo)
    assert timeouts[1] < timeouts[0]
    assert timeouts[2] == timeouts[1]  # the same sender twice is one confirmation
    assert timeouts[4] == pytest.approx(lo)  # k confirmations reach the minimum
    assert timeouts[5] == pytest.approx(lo)
    assert s.deadline == pytest.approx(10.0 + lo)
    assert Suspicion(incarnation=1, sender="a", k=0, min_t=1, max_t=6, start=0).timeout() == 1


# ---------------------------------------------------------------- member table


def test_probe_order_visits_every_live_member_once_per_pass() -> None:
    t = MemberTable("me", random.Random(1))
    t.add(NodeState("me", ("1.1.1.1", 1), 0, 0))
    for i in range(10):
        t.add(NodeState(f"n{i}", ("1.1.1.1", 2 + i), 0, 0))
    t.nodes["n3"].state = State.DEAD
    t.changed()
    seen = []
    for _ in range(9 * 3):
        n = t.next_probe_target()
        assert n is not None
        seen.append(n.name)
    for k in range(3):
        chunk = seen[9 * k : 9 * (k + 1)]
        assert sorted(chunk) == sorted(f"n{i}" for i in range(10) if i != 3)
    assert t.active_count() == 10
    t.forget("n3")
    assert "n3" not in t and t.tombstones["n3"].incarnation == 0
