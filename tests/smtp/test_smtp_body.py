"""The DATA reader of the SMTP core: end marker, size limit, unstuffing."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from duravip.smtp.body import TOO_BIG, BodyReader, unstuff


def feed(reader: BodyReader, chunks: list[bytes]) -> tuple[object, bytes]:
    """Feed ``chunks`` until a result; returns it and every byte not consumed."""
    buf = bytearray()
    reader.start()
    for i, chunk in enumerate(chunks):
        buf += chunk
        got = reader.read(buf)
        if got is not None:
            return got, bytes(buf) + b"".join(chunks[i + 1 :])
    return None, bytes(buf)


def test_empty_body_and_following_bytes_stay_in_the_buffer() -> None:
    got, buf = feed(BodyReader(100), [b".\r\nQUIT\r\n"])
    assert got == b""
    assert buf == b"QUIT\r\n"


def test_body_keeps_its_last_crlf_and_stays_stuffed() -> None:
    got, buf = feed(BodyReader(100), [b"..a\r\nb\r\n.\r\nNOOP\r\n"])
    assert got == b"..a\r\nb\r\n"
    assert buf == b"NOOP\r\n"


def test_only_crlf_dot_crlf_ends_a_body() -> None:
    reader = BodyReader(100)
    for fake in (b"a\n.\nb", b"a\n.\r\nb", b"a\r.\rb", b"a\r\n.\nb"):
        got, buf = feed(reader, [fake])
        assert got is None and buf == fake


@given(st.binary(max_size=60), st.lists(st.integers(0, 70), max_size=6))
def test_chunking_never_changes_the_result(body: bytes, cuts: list[int]) -> None:
    wire = body.replace(b"\r\n.\r\n", b"\r\n..\r\n") + b"\r\n.\r\nRSET\r\n"
    whole, rest_whole = feed(BodyReader(40), [wire])
    points = sorted({min(c, len(wire)) for c in cuts} | {0, len(wire)})
    chunks = [wire[a:b] for a, b in itertools.pairwise(points)]
    split, rest_split = feed(BodyReader(40), chunks)
    assert split == whole
    assert rest_split == rest_whole


def test_oversized_body_is_discarded_while_streaming() -> None:
    reader = BodyReader(10)
    reader.start()
    buf = bytearray()
    for _ in range(100):
        buf += b"x" * 50
        assert reader.read(buf) is None
        assert len(buf) <= 4  # only what may start the end marker is kept
    buf += b"\r\n.\r\nQUIT\r\n"
    assert reader.read(buf) is TOO_BIG
    assert buf == b"QUIT\r\n"


def test_size_limit_counts_the_last_crlf() -> None:
    assert feed(BodyReader(5), [b"abc\r\n\r\n.\r\n"])[0] is TOO_BIG  # 7 bytes
    assert feed(BodyReader(5), [b"abc\r\n.\r\n"])[0] == b"abc\r\n"  # 5 bytes


def test_start_resets_a_discarding_reader() -> None:
    reader = BodyReader(4)
    assert feed(reader, [b"x" * 20, b"\r\n.\r\n"])[0] is TOO_BIG
    assert feed(reader, [b"ok\r\n.\r\n"])[0] == b"ok\r\n"


def test_unstuff() -> None:
    assert unstuff(b"..a\r\n..\r\n...b\r\n") == b".a\r\n.\r\n..b\r\n"
    assert unstuff(b"a.\r\n") == b"a.\r\n"
    assert unstuff(b"") == b""
