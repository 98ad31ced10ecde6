"""The sans-IO SMTP state machine, byte for byte."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from duravip.config import SmtpLimits
from duravip.smtp.server import (
    ConnectionClosed,
    MessageReceived,
    NeedData,
    ProtocolUsageError,
    ServerSettings,
    SmtpServer,
)

HOST = "node-a"
SETTINGS = ServerSettings(hostname=HOST)
REPLY_LINE = re.compile(rb"^\d{3}[ -][^\r\n]*$")


def drive(
    chunks: Iterable[bytes],
    settings: ServerSettings = SETTINGS,
    *,
    eof: bool = True,
    decide: str = "accept",
) -> tuple[bytes, list[MessageReceived], bool]:
    """Feed chunks, accept (or reject) each message; return (output, messages, closed)."""
    server = SmtpServer(settings)
    out = [server.data_to_send()]
    messages: list[MessageReceived] = []
    closed = False

    def pump() -> None:
        nonlocal closed
        while True:
            ev = server.next_event()
            if isinstance(ev, MessageReceived):
                messages.append(ev)
                if decide == "accept":
                    server.accept_message(f"Q{len(messages)}")
                else:
                    server.reject_message(451, "4.3.0", "try later")
                continue
            if isinstance(ev, ConnectionClosed):
                closed = True
            assert isinstance(ev, NeedData | ConnectionClosed)
            out.append(server.data_to_send())
            return

    for chunk in chunks:
        server.receive_data(chunk)
        pump()
    if eof:
        server.receive_data(b"")
        pump()
    return b"".join(out), messages, closed


def codes(out: bytes) -> list[str]:
    """Reply codes of final reply lines, in order (multi-line replies count once)."""
    return [line[:3].decode() for line in out.split(b"\r\n") if line and line[3:4] == b" "]


def session(
    *lines: str, settings: ServerSettings = SETTINGS
) -> tuple[list[str], bytes, list[MessageReceived]]:
    data = "".join(line + "\r\n" for line in lines).encode()
    out, msgs, _ = drive([data], settings)
    return codes(out), out, msgs


# --------------------------------------------------------------- basics


def test_banner_names_the_node() -> None:
    server = SmtpServer(SETTINGS)
    assert server.data_to_send() == b"220 node-a ESMTP duravip\r\n"
    assert isinstance(server.next_event(), NeedData)


def test_ehlo_advertises_extensions() -> None:
    s = ServerSettings(
        hostname=HOST, limits=SmtpLimits(max_message_size=1234), extra_ehlo=("XMMOVE",)
    )
    _, out, _ = session("EHLO client.example", settings=s)
    assert out.split(b"\r\n", 1)[1] == (
        b"250-node-a\r\n250-PIPELINING\r\n250-SIZE 1234\r\n250-8BITMIME\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n250 XMMOVE\r\n"
    )


def test_full_transaction() -> None:
    c, out, msgs = session(
        "EHLO c",
        "MAIL FROM:<a@x> SIZE=100 BODY=8BITMIME",
        "RCPT TO:<b@y>",
        "RCPT TO:<c@y>",
        "DATA",
        "Subject: hi",
        "",
        "..leading dot",
        ".",
        "QUIT",
    )
    assert c == ["220", "250", "250", "250", "250", "354", "250", "221"]
    assert b"250 2.0.0 Ok: queued as Q1\r\n" in out
    assert b"221 2.0.0 Bye\r\n" in out
    (m,) = msgs
    assert m.mail_from == "a@x"
    assert m.rcpt_to == ("b@y", "c@y")
    assert m.helo == "c"
    assert m.mail_params == {"SIZE": "100", "BODY": "8BITMIME"}
    assert m.data == b"Subject: hi\r\n\r\n.leading dot\r\n"


def test_helo_and_null_sender_and_source_route() -> None:
    c, out, msgs = session(
        "HELO c", "MAIL FROM:<>", "RCPT TO:<@relay.example:b@y>", "DATA", "x", ".", "QUIT"
    )
    assert c == ["220", "250", "250", "250", "354", "250", "221"]
    assert b"250 node-a\r\n" in out
    assert msgs[0].mail_from == "" and msgs[0].rcpt_to == ("b@y",)


def test_empty_body_and_leading_dot_first_line() -> None:
    _, _, msgs = session("HELO c", "MAIL FROM:<a>", "RCPT TO:<b>", "DATA", ".", "QUIT")
    assert msgs[0].data == b""
    _, _, msgs = session(
        "HELO c", "MAIL FROM:<a>", "RCPT TO:<b>", "DATA", "..", "...x", ".", "QUIT"
    )
    assert msgs[0].data == b".\r\n..x\r\n"


def test_bare_lf_dot_does_not_end_data() -> None:
    """Only CRLF.CRLF ends DATA: a bare-LF variant is body (no SMTP smuggling).

    By default such a body is refused (550 5.5.2), the session goes on; with
    ``bare_newline = normalize`` it is one message, rewritten to CRLF.
    """
    data = b"HELO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\nx\n.\nMAIL FROM:<evil>\r\n.\r\n"
    out, msgs, _ = drive([data + b"NOOP\r\n"])
    assert msgs == []
    assert codes(out)[-2:] == ["550", "250"]
    assert b"550 5.5.2 Error: bare <LF> or <CR> in message" in out
    s = ServerSettings(hostname=HOST, limits=SmtpLimits(bare_newline="normalize"))
    _out, msgs, _ = drive([data], s)
    assert len(msgs) == 1
    assert msgs[0].data == b"x\r\n.\r\nMAIL FROM:<evil>\r\n"


def test_several_messages_one_session() -> None:
    lines = ["EHLO c"]
    for i in range(5):
        lines += [f"MAIL FROM:<a{i}>", "RCPT TO:<b>", "DATA", f"body {i}", "."]
    c, _, msgs = session(*lines, "QUIT")
    assert [m.mail_from for m in msgs] == [f"a{i}" for i in range(5)]
    assert [m.data for m in msgs] == [f"body {i}\r\n".encode() for i in range(5)]
    assert c.count("250") == 1 + 5 * 3


def test_simple_commands() -> None:
    c, out, _ = session("NOOP", "HELP", "VRFY someone", "RSET", "QUIT")
    assert c == ["220", "250", "214", "252", "250", "221"]
    assert b"252 2.0.0 " in out and b"214 2.0.0 " in out


def test_commands_case_insensitive_and_bare_lf() -> None:
    out, msgs, _ = drive([b"ehlo c\nmail from:<a>\nrcpt to:<b>\ndata\nx\r\n.\r\nquit\n"])
    assert codes(out) == ["220", "250", "250", "250", "354", "250", "221"]
    assert len(msgs) == 1


def test_rset_clears_transaction() -> None:
    c, _, _ = session("EHLO c", "MAIL FROM:<a>", "RCPT TO:<b>", "RSET", "DATA", "RCPT TO:<b>")
    assert c == ["220", "250", "250", "250", "250", "503", "503"]


def test_ehlo_resets_transaction() -> None:
    c, _, _ = session("EHLO c", "MAIL FROM:<a>", "EHLO c", "RCPT TO:<b>")
    assert c == ["220", "250", "250", "250", "503"]


def test_quit_ignores_later_input() -> None:
    out, _, closed = drive([b"QUIT\r\nNOOP\r\nNOOP\r\n"])
    assert codes(out) == ["220", "221"] and closed


# --------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["FOO"], "500 5.5.2"),
        ([""], "500 5.5.2"),
        (["EXPN list"], "502 5.5.1"),
        (["STARTTLS"], "502 5.5.1"),
        (["EHLO"], "501 5.5.4"),
        (["HELO"], "501 5.5.4"),
        (["MAIL FROM:<a>"], "503 5.5.1"),
        (["EHLO c", "MAIL TO:<a>"], "501 5.5.4"),
        (["EHLO c", "MAIL FROM:<a"], "501 5.1.7"),
        (["EHLO c", "MAIL FROM:<a b>"], "501 5.1.7"),
        (["EHLO c", "MAIL FROM:<a>x"], "501 5.1.7"),
        (["EHLO c", "MAIL FROM:<a> SIZE=abc"], "501 5.5.4"),
        (["EHLO c", "MAIL FROM:<a> SIZE=999999999999"], "552 5.3.4"),
        (["EHLO c", "MAIL FROM:<a> BODY=BINARYMIME"], "501 5.5.4"),
        (["EHLO c", "MAIL FROM:<a> SMTPUTF8"], "555 5.5.4"),
        (["EHLO c", "MAIL FROM:<a> SIZE=1 SIZE=2"], "501 5.5.4"),
        (["EHLO c", "MAIL FROM:<a>", "MAIL FROM:<a>"], "503 5.5.1"),
        (["EHLO c", "RCPT TO:<b>"], "503 5.5.1"),
        (["EHLO c", "MAIL FROM:<a>", "RCPT <b>"], "501 5.5.4"),
        (["EHLO c", "MAIL FROM:<a>", "RCPT TO:<>"], "501 5.1.3"),
        (["EHLO c", "MAIL FROM:<a>", "RCPT TO:<b> NOTIFY=NEVER"], "555 5.5.4"),
        (["EHLO c", "DATA"], "503 5.5.1"),
        (["EHLO c", "MAIL FROM:<a>", "DATA"], "503 5.5.1"),
        (["EHLO c", "MAIL FROM:<a>", "RCPT TO:<>", "DATA"], "554 5.5.1"),
        (["EHLO c", "MAIL FROM:<a>", "RCPT TO:<b>", "DATA x"], "501 5.5.4"),
        (["RSET x"], "501 5.5.4"),
        (["QUIT now"], "501 5.5.4"),
        (["VRFY"], "501 5.5.4"),
    ],
)
def test_error_replies(lines: list[str], expected: str) -> None:
    _, out, _ = session(*lines)
    last = out.rstrip(b"\r\n").split(b"\r\n")[-1]
    assert last.startswith(expected.encode() + b" "), last


def test_non_ascii_address_rejected() -> None:
    out, _, _ = drive(["EHLO c\r\nMAIL FROM:<é@x>\r\n".encode()])
    assert out.endswith(b"\r\n") and b"501 5.1.7" in out


def test_extra_mail_params_pass_through_upper_cased() -> None:
    s = ServerSettings(hostname=HOST, extra_mail_params=frozenset({"xbinding", "XMMOVEID"}))
    c, _, msgs = session(
        "EHLO c",
        "MAIL FROM:<a> xbinding=b1 XMmoveId=42",
        "RCPT TO:<b>",
        "DATA",
        "x",
        ".",
        settings=s,
    )
    assert c[-1] == "250"
    assert msgs[0].mail_params == {"XBINDING": "b1", "XMMOVEID": "42"}


def test_too_many_recipients_is_452_and_keeps_the_accepted_ones() -> None:
    s = ServerSettings(hostname=HOST, limits=SmtpLimits(max_recipients=2))
    c, out, msgs = session(
        "EHLO c",
        "MAIL FROM:<a>",
        "RCPT TO:<1>",
        "RCPT TO:<2>",
        "RCPT TO:<3>",
        "DATA",
        "x",
        ".",
        settings=s,
    )
    assert c == ["220", "250", "250", "250", "250", "452", "354", "250"]
    assert b"452 4.5.3 " in out
    assert msgs[0].rcpt_to == ("1", "2")


def test_too_many_errors_closes_with_421() -> None:
    s = ServerSettings(hostname=HOST, limits=SmtpLimits(max_errors=3))
    out, _, closed = drive([b"A\r\nB\r\nC\r\nNOOP\r\n"], s)
    assert codes(out) == ["220", "500", "500", "500", "421"]
    assert b"421 4.7.0 node-a " in out and closed


def test_command_line_too_long() -> None:
    s = ServerSettings(hostname=HOST, limits=SmtpLimits(max_line_length=20))
    ok = b"NOOP " + b"x" * 13 + b"\r\n"  # exactly 20 with CRLF
    bad = b"NOOP " + b"x" * 14 + b"\r\n"
    out, _, _ = drive([ok + bad + b"NOOP\r\n"], s)
    assert codes(out) == ["220", "250", "500", "250"]
    assert b"500 5.5.6 " in out
    # Same when the long line trickles in without its end for a long time.
    out2, _, _ = drive([ok, b"NOOP ", b"x" * 500, b"y" * 500, b"\r\nNOOP\r\n"], s)
    assert out2 == out


def test_message_size_limit_552_after_final_dot_then_session_continues() -> None:
    s = ServerSettings(hostname=HOST, limits=SmtpLimits(max_message_size=100))
    body = b"x" * 60 + b"\r\n"
    head = b"EHLO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\n"
    out, msgs, _ = drive([head, body, body, body, b".\r\nMAIL FROM:<a>\r\nQUIT\r\n"], s)
    assert codes(out) == ["220", "250", "250", "250", "354", "552", "250", "221"]
    assert b"552 5.3.4 " in out and msgs == []
    # A body of exactly the limit (as transmitted) passes.
    exact = b"y" * 98 + b"\r\n"
    out, msgs, _ = drive([head + exact + b".\r\n"], s)
    assert codes(out)[-1] == "250" and msgs[0].data == exact


def test_oversized_body_is_not_buffered() -> None:
    s = ServerSettings(hostname=HOST, limits=SmtpLimits(max_message_size=1000))
    server = SmtpServer(s)
    server.receive_data(b"EHLO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\n")
    assert isinstance(server.next_event(), NeedData)
    for _ in range(1000):
        server.receive_data(b"z" * 1000 + b"\r\n")
        assert isinstance(server.next_event(), NeedData)
        assert len(server._in) < 2000  # never more than the limit plus one chunk
    server.receive_data(b".\r\n")
    assert isinstance(server.next_event(), NeedData)
    assert server.data_to_send().endswith(b"552 5.3.4 Error: message size exceeds fixed limit\r\n")
    assert not server.in_transaction


def test_reject_message_and_usage_errors() -> None:
    out, _msgs, _ = drive(
        [b"HELO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\nx\r\n.\r\nNOOP\r\n"], decide="reject"
    )
    assert codes(out) == ["220", "250", "250", "250", "354", "451", "250"]
    server = SmtpServer(SETTINGS)
    with pytest.raises(ProtocolUsageError):
        server.accept_message("x")
    server.receive_data(b"HELO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\nx\r\n.\r\n")
    assert isinstance(server.next_event(), MessageReceived)
    with pytest.raises(ProtocolUsageError):
        server.next_event()
    with pytest.raises(ValueError, match="4xx or 5xx"):
        server.reject_message(250, "2.0.0", "no")


def test_shutdown_and_timeout() -> None:
    server = SmtpServer(SETTINGS)
    server.shutdown()
    assert (
        server.data_to_send()
        == b"220 node-a ESMTP duravip\r\n421 4.3.2 node-a Service shutting down\r\n"
    )
    assert isinstance(server.next_event(), ConnectionClosed)
    server.shutdown()
    assert server.data_to_send() == b""
    server = SmtpServer(SETTINGS)
    server.data_to_send()
    server.timeout()
    assert server.data_to_send().startswith(b"421 4.4.2 node-a ")
    assert server.closed


def test_eof_mid_data_closes_without_message() -> None:
    out, msgs, closed = drive([b"HELO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\npartial"])
    assert closed and msgs == []
    assert codes(out) == ["220", "250", "250", "250", "354"]


def test_in_transaction_and_in_data_flags() -> None:
    server = SmtpServer(SETTINGS)
    server.receive_data(b"HELO c\r\n")
    server.next_event()
    assert not server.in_transaction
    server.receive_data(b"MAIL FROM:<a>\r\n")
    server.next_event()
    assert server.in_transaction and not server.in_data
    server.receive_data(b"RCPT TO:<b>\r\nDATA\r\n")
    server.next_event()
    assert server.in_data


# ------------------------------------------------------------ hypothesis

SCRIPT = (
    b"EHLO c\r\nMAIL FROM:<a> SIZE=10\r\nRCPT TO:<b>\r\nRCPT TO:<>\r\nDATA\r\n"
    b"..one\r\nx\r\n\r\n...\r\n.\r\nBOGUS\r\nHELO d\r\nMAIL FROM:<c>\r\nRCPT TO:<d>\r\n"
    b"DATA\r\n.\r\nVRFY x\r\nRSET\r\nNOOP\r\nQUIT\r\n"
)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    # b"" means EOF to the server, so no empty chunks.
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


def test_pipelined_all_at_once_equals_byte_by_byte() -> None:
    whole = drive([SCRIPT])
    bytewise = drive([SCRIPT[i : i + 1] for i in range(len(SCRIPT))])
    assert whole == bytewise
    assert codes(whole[0]) == [
        "220",
        "250",
        "250",
        "250",
        "501",
        "354",
        "250",
        "500",
        "250",
        "250",
        "250",
        "354",
        "250",
        "252",
        "250",
        "250",
        "221",
    ]
    assert [m.data for m in whole[1]] == [b".one\r\nx\r\n\r\n..\r\n", b""]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
def test_pipelining_is_chunking_independent(cuts: list[int]) -> None:
    assert drive(split_at(SCRIPT, cuts)) == drive([SCRIPT])


# Lines without CR or LF: a bare one is refused by default (see tests/security).
body_lines = st.lists(
    st.one_of(
        st.sampled_from([b"", b".", b"..", b"...", b". ", b"x.", b".x.", b"\x00."]),
        st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    ),
    max_size=20,
)


@settings(max_examples=300, deadline=None)
@given(body_lines, st.lists(st.integers(min_value=0, max_value=10_000), max_size=20))
def test_data_round_trip_across_chunk_splits(lines: list[bytes], cuts: list[int]) -> None:
    """Dot-stuff any body, split the stream anywhere: the sink gets the body back."""
    body = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    stream = b"HELO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\n" + stuffed + b".\r\nNOOP\r\n"
    out, msgs, _ = drive(split_at(stream, cuts))
    assert [m.data for m in msgs] == [body]
    assert codes(out) == ["220", "250", "250", "250", "354", "250", "250"]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=64),
            st.sampled_from(
                [
                    b"EHLO x\r\n",
                    b"MAIL FROM:<a>\r\n",
                    b"RCPT TO:<b>\r\n",
                    b"DATA\r\n",
                    b".\r\n",
                    b"\r\n.\r\n",
                    b"QUIT\r\n",
                    b"RSET\r\n",
                    b"\n",
                    b"\r",
                ]
            ),
        ),
        max_size=40,
    ),
    st.booleans(),
)
def test_arbitrary_bytes_never_raise_and_replies_are_well_formed(
    chunks: list[bytes], eof: bool
) -> None:
    chunks = [c for c in chunks if c]
    s = ServerSettings(hostname=HOST, limits=SmtpLimits(max_line_length=80, max_message_size=200))
    out, _, _ = drive(chunks, s, eof=eof)
    assert out.endswith(b"\r\n")
    for line in out[:-2].split(b"\r\n"):
        assert REPLY_LINE.match(line), line


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from(
                [
                    b"EHLO x\r\n",
                    b"MAIL FROM:<a>\r\n",
                    b"RCPT TO:<b>\r\n",
                    b"DATA\r\n",
                    b".\r\n",
                    b"..\r\n",
                    b"\r\n.\r\n",
                    b"x" * 70,
                    b"RSET\r\n",
                    b"\r\n",
                    b"\n",
                ]
            ),
            st.binary(max_size=20),
        ),
        max_size=60,
    ),
    st.lists(st.integers(min_value=0, max_value=100_000), max_size=30),
)
def test_any_stream_any_chunking_same_replies(tokens: list[bytes], cuts: list[int]) -> None:
    """Limits included (line length, size, errors): replies never depend on chunking."""
    s = ServerSettings(
        hostname=HOST, limits=SmtpLimits(max_line_length=60, max_message_size=150, max_errors=5)
    )
    stream = b"".join(tokens)
    whole = drive([stream] if stream else [], s)
    assert drive(split_at(stream, cuts), s) == whole


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=-3, max_value=3), st.data())
def test_size_limit_boundary_across_chunk_splits(delta: int, data: st.DataObject) -> None:
    """A body of limit + delta bytes is accepted iff delta <= 0, however it is split."""
    limit = 100
    s = ServerSettings(hostname=HOST, limits=SmtpLimits(max_message_size=limit))
    body = b"y" * (limit + delta - 2) + b"\r\n"
    head = b"HELO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\n"
    stream = head + body + b".\r\nNOOP\r\n"
    # Cut inside the body and the end marker, where the size decisions happen.
    cuts = data.draw(
        st.lists(st.integers(min_value=len(head), max_value=len(stream) - 6), max_size=3)
    )
    out, msgs, _ = drive(split_at(stream, cuts), s)
    if delta <= 0:
        assert [m.data for m in msgs] == [body]
    else:
        assert msgs == [] and b"552 5.3.4 " in out
    assert codes(out)[-1] == "250"
