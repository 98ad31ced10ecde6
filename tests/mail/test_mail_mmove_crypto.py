"""The sealed mmove stream: framing (sans-IO), key derivation, and the Trio wrapper."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from duravip.mail import mmove_crypto as mc
from duravip.mail.mmove_crypto import (
    FrameOpener,
    FrameRejected,
    FrameSealer,
    SealedStream,
    derive_keys,
)

KEY = os.urandom(32)
NONCE_S = "ab" * 32
NONCE_C = "cd" * 32


def _open_all(opener: FrameOpener, wire: bytes) -> bytes:
    opener.feed(wire)
    out = b""
    while (frame := opener.next_frame()) is not None:
        out += frame
    return out


# --------------------------------------------------------------- key derivation


def test_keys_differ_per_direction_nonce_key_and_cluster() -> None:
    k = derive_keys(KEY, NONCE_S, NONCE_C, "c1")
    assert len(k.client_to_server) == 32 and len(k.server_to_client) == 32
    assert k.client_to_server != k.server_to_client
    assert derive_keys(KEY, NONCE_S, NONCE_C, "c1") == k  # both sides agree
    others = [
        derive_keys(KEY, NONCE_C, NONCE_S, "c1"),
        derive_keys(KEY, NONCE_S, "ef" * 32, "c1"),
        derive_keys(os.urandom(32), NONCE_S, NONCE_C, "c1"),
        derive_keys(KEY, NONCE_S, NONCE_C, "c2"),
    ]
    for o in others:
        assert {o.client_to_server, o.server_to_client}.isdisjoint(
            {k.client_to_server, k.server_to_client}
        )
    # Neither derived key is the keyring key itself.
    assert KEY not in (k.client_to_server, k.server_to_client)


def test_short_keyring_keys_still_give_aes256_keys() -> None:
    k = derive_keys(os.urandom(16), NONCE_S, NONCE_C, "c1")
    assert len(k.client_to_server) == 32


# ------------------------------------------------------------------- framing


_messages = st.lists(st.binary(min_size=0, max_size=3000), max_size=8)


@settings(max_examples=200, deadline=None)
@given(_messages, st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=40))
def test_round_trip_over_any_chunking(messages: list[bytes], cuts: list[int]) -> None:
    sealer = FrameSealer(KEY, max_frame=1024)  # small frames: messages span several
    opener = FrameOpener(KEY, max_frame=1024)
    wire = b"".join(sealer.seal(m) for m in messages)
    got = b""
    pos, i = 0, 0
    while pos < len(wire):
        step = cuts[i % len(cuts)]
        i += 1
        opener.feed(wire[pos : pos + step])
        pos += step
        while (frame := opener.next_frame()) is not None:
            got += frame
    opener.end()  # a clean frame boundary: no error
    assert got == b"".join(messages)
    assert opener.buffered == 0


def test_nothing_of_the_plaintext_is_on_the_wire() -> None:
    secret = b"MAIL FROM:<alice@example.org>\r\nSubject: payroll\r\n"
    wire = FrameSealer(KEY).seal(secret * 10)
    for piece in (b"alice", b"MAIL FROM", b"payroll", b"example.org"):
        assert piece not in wire


def test_empty_send_makes_no_frame() -> None:
    assert FrameSealer(KEY).seal(b"") == b""


def test_frames_are_capped() -> None:
    sealer = FrameSealer(KEY, max_frame=100)
    wire = sealer.seal(b"x" * 250)
    assert len(wire) == 250 + 3 * mc.OVERHEAD  # three frames: 100, 100, 50
    assert _open_all(FrameOpener(KEY, max_frame=100), wire) == b"x" * 250


def _two_frames() -> tuple[bytes, bytes]:
    s = FrameSealer(KEY)
    return s.seal(b"EHLO n1\r\n"), s.seal(b"MAIL FROM:<a@x>\r\n")


def test_every_tampered_byte_is_rejected() -> None:
    f0, f1 = _two_frames()
    wire = f0 + f1
    for i in range(len(wire)):
        for flip in (0x01, 0x80):
            bad = bytearray(wire)
            bad[i] ^= flip
            opener = FrameOpener(KEY)
            opener.feed(bytes(bad))
            got = b""
            with pytest.raises(FrameRejected):
                while (frame := opener.next_frame()) is not None:
                    got += frame
                opener.end()
            # Only frames before the tampered one ever come out, intact.
            assert got == (b"EHLO n1\r\n" if i >= len(f0) else b"")


def test_replayed_reordered_dropped_and_reflected_frames_are_rejected() -> None:
    s = FrameSealer(KEY)
    f = [s.seal(bytes([65 + i]) * 10) for i in range(3)]
    cases = {
        "replay": f[0] + f[0],
        "reorder": f[1] + f[0],
        "drop": f[0] + f[2],
        "replay an old one later": f[0] + f[1] + f[0],
    }
    for name, wire in cases.items():
        opener = FrameOpener(KEY)
        opener.feed(wire)
        with pytest.raises(FrameRejected):
            while opener.next_frame() is not None:
                pass
        assert name  # (for the failure message)
    # A frame sealed for the other direction (reflection) fails: other key.
    keys = derive_keys(KEY, NONCE_S, NONCE_C, "c")
    reflected = FrameSealer(keys.server_to_client).seal(b"220 hi\r\n")
    opener = FrameOpener(keys.client_to_server)
    opener.feed(reflected)
    with pytest.raises(FrameRejected):
        opener.next_frame()


def test_truncated_frame_is_rejected_at_end_of_stream() -> None:
    f0, f1 = _two_frames()
    for cut in (1, mc.HEADER_LEN - 1, mc.HEADER_LEN, len(f1) - 1):
        opener = FrameOpener(KEY)
        opener.feed(f0 + f1[:cut])
        assert opener.next_frame() == b"EHLO n1\r\n"
        assert opener.next_frame() is None  # waiting for the rest
        with pytest.raises(FrameRejected, match="truncated"):
            opener.end()


def test_oversize_frame_is_rejected_from_its_header_alone() -> None:
    # A peer holding the key announces a 1 GiB frame: refused on the 20 header
    # bytes, before a byte of the payload is buffered or allocated.
    big = FrameSealer(KEY, max_frame=1 << 30)
    header = big.seal_header(1 << 30)
    opener = FrameOpener(KEY)
    opener.feed(header)
    with pytest.raises(FrameRejected, match="too large"):
        opener.next_frame()
    assert opener.buffered <= mc.HEADER_LEN


def test_a_rejected_opener_stays_rejected() -> None:
    s = FrameSealer(KEY)
    f0, f1 = s.seal(b"a"), s.seal(b"b")
    opener = FrameOpener(KEY)
    opener.feed(f1)
    with pytest.raises(FrameRejected):
        opener.next_frame()
    opener.feed(f0)  # the genuine next frame cannot revive it
    with pytest.raises(FrameRejected):
        opener.next_frame()


def test_wrong_key_is_rejected() -> None:
    opener = FrameOpener(os.urandom(32))
    opener.feed(FrameSealer(KEY).seal(b"hello"))
    with pytest.raises(FrameRejected):
        opener.next_frame()


# ------------------------------------------------------------- the Trio stream


def _sealed_pair(
    maker: object = trio.testing.memory_stream_pair,
) -> tuple[SealedStream, SealedStream]:
    a, b = maker()  # type: ignore[operator]
    keys = derive_keys(KEY, NONCE_S, NONCE_C, "c")
    client = SealedStream(a, keys.client_to_server, keys.server_to_client)
    server = SealedStream(b, keys.server_to_client, keys.client_to_server)
    return client, server


async def test_sealed_stream_passes_trios_generic_stream_checks() -> None:
    async def maker() -> tuple[SealedStream, SealedStream]:
        return _sealed_pair()

    async def clogged() -> tuple[SealedStream, SealedStream]:
        return _sealed_pair(trio.testing.lockstep_stream_pair)

    with trio.fail_after(60):
        await trio.testing.check_two_way_stream(maker, clogged)


async def test_initial_bytes_are_opened_first() -> None:
    a, b = trio.testing.memory_stream_pair()
    keys = derive_keys(KEY, NONCE_S, NONCE_C, "c")
    sealer = FrameSealer(keys.server_to_client)
    wire = sealer.seal(b"220 first\r\n") + sealer.seal(b"250 second\r\n")
    client = SealedStream(
        a, keys.client_to_server, keys.server_to_client, initial=wire[:30]
    )  # what the preamble reader had read past its line
    with trio.fail_after(5):
        await b.send_all(wire[30:])
        got = b""
        while len(got) < len(b"220 first\r\n250 second\r\n"):
            got += await client.receive_some(5)
    assert got == b"220 first\r\n250 second\r\n"


async def test_tampered_stream_raises_frame_rejected_once_and_reports_it() -> None:
    a, b = trio.testing.memory_stream_pair()
    keys = derive_keys(KEY, NONCE_S, NONCE_C, "c")
    seen: list[FrameRejected] = []
    server = SealedStream(b, keys.server_to_client, keys.client_to_server, on_reject=seen.append)
    wire = bytearray(FrameSealer(keys.client_to_server).seal(b"DATA\r\n"))
    wire[-1] ^= 1
    with trio.fail_after(5):
        await a.send_all(bytes(wire))
        with pytest.raises(FrameRejected):
            await server.receive_some()
        # The connection is over for both directions; the callback ran once.
        with pytest.raises(trio.BrokenResourceError):
            await server.receive_some()
        with pytest.raises(trio.BrokenResourceError):
            await server.send_all(b"250 ok\r\n")
    assert len(seen) == 1
    assert isinstance(seen[0], trio.BrokenResourceError)  # every Stream user ends on it


async def test_eof_inside_a_frame_is_rejected_eof_between_frames_is_not() -> None:
    keys = derive_keys(KEY, NONCE_S, NONCE_C, "c")
    frame = FrameSealer(keys.client_to_server).seal(b"QUIT\r\n")
    for cut, truncated in ((len(frame), False), (len(frame) - 3, True)):
        a, b = trio.testing.memory_stream_pair()
        server = SealedStream(b, keys.server_to_client, keys.client_to_server)
        with trio.fail_after(5):
            await a.send_all(frame[:cut])
            await a.aclose()
            if truncated:
                with pytest.raises(FrameRejected, match="truncated"):
                    await server.receive_some()
            else:
                assert await server.receive_some() == b"QUIT\r\n"
                assert await server.receive_some() == b""
