"""STARTTLS in the sans-IO core (RFC 3207): advertisement, state reset, injection, required."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from duravip.smtp.server import (
    ConnectionClosed,
    MessageReceived,
    NeedData,
    ProtocolUsageError,
    ServerSettings,
    SmtpServer,
    StartTLS,
)
from duravip.smtp.settings import TlsMode

HOST = "node-t"


def server(tls: TlsMode = "optional") -> SmtpServer:
    s = SmtpServer(ServerSettings(hostname=HOST, tls=tls))
    assert s.data_to_send().startswith(b"220 node-t ")
    return s


def feed(s: SmtpServer, data: bytes) -> tuple[object, bytes]:
    s.receive_data(data)
    event = s.next_event()
    return event, s.data_to_send()


def ehlo_keywords(reply: bytes) -> list[bytes]:
    return [line[4:] for line in reply.split(b"\r\n")[1:] if line]


def test_ehlo_advertises_starttls_only_when_available_and_not_active() -> None:
    s = server()
    _, out = feed(s, b"EHLO c\r\n")
    assert b"STARTTLS" in ehlo_keywords(out)
    event, out = feed(s, b"STARTTLS\r\n")
    assert isinstance(event, StartTLS)
    assert out == b"220 2.0.0 Ready to start TLS\r\n"
    s.tls_started()
    assert s.tls_active
    _, out = feed(s, b"EHLO c\r\n")
    assert out.startswith(b"250-node-t\r\n")
    assert b"STARTTLS" not in ehlo_keywords(out)


def test_off_does_not_advertise_and_answers_502() -> None:
    s = server("off")
    _, out = feed(s, b"EHLO c\r\n")
    assert b"STARTTLS" not in ehlo_keywords(out)
    event, out = feed(s, b"STARTTLS\r\n")
    assert isinstance(event, NeedData)
    assert out == b"502 5.5.1 Error: command not implemented\r\n"
    assert not s.tls_active


def test_state_resets_after_the_handshake() -> None:
    """RFC 3207 4.2: the server forgets the EHLO; MAIL needs a new EHLO first."""
    s = server()
    feed(s, b"EHLO before\r\n")
    assert s.helo == "before"
    event, _ = feed(s, b"STARTTLS\r\n")
    assert isinstance(event, StartTLS)
    s.tls_started()
    assert s.helo is None and not s.esmtp and not s.in_transaction
    _, out = feed(s, b"MAIL FROM:<a@x>\r\n")
    assert out == b"503 5.5.1 Error: send HELO/EHLO first\r\n"
    _, out = feed(s, b"EHLO after\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n")
    assert out.endswith(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n")
    event, _ = feed(s, b"hi\r\n.\r\n")
    assert isinstance(event, MessageReceived) and event.helo == "after"


def test_no_banner_after_the_handshake() -> None:
    s = server()
    feed(s, b"EHLO c\r\n")
    feed(s, b"STARTTLS\r\n")
    s.tls_started()
    assert s.data_to_send() == b""
    assert isinstance(s.next_event(), NeedData)
    assert s.data_to_send() == b""


@pytest.mark.parametrize(
    "after",
    [
        b"MAIL FROM:<evil@x>\r\n",
        b"RSET\r\n",
        b"\r\n",
        b"M",  # even one byte of a partial line
        b"EHLO c\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\n",
    ],
)
def test_command_pipelined_after_starttls_is_rejected_and_never_run(after: bytes) -> None:
    """CVE-2011-0411: plaintext behind STARTTLS, in the same read, is never executed."""
    s = server()
    feed(s, b"EHLO c\r\n")
    event, out = feed(s, b"STARTTLS\r\n" + after)
    assert isinstance(event, ConnectionClosed)
    assert out == b"554 5.5.1 Error: command pipelined after STARTTLS\r\n"
    assert s.closed and not s.tls_active
    assert s.starttls_pipelining_rejects == 1
    # Nothing more happens, whatever arrives later.
    event, out = feed(s, b"MAIL FROM:<evil@x>\r\n")
    assert isinstance(event, ConnectionClosed) and out == b""


def test_starttls_and_ehlo_in_one_read_before_it_are_fine() -> None:
    """Bytes *before* STARTTLS may be pipelined (EHLO then STARTTLS in one write)."""
    s = server()
    event, out = feed(s, b"EHLO c\r\nSTARTTLS\r\n")
    assert isinstance(event, StartTLS)
    assert out.endswith(b"250 STARTTLS\r\n220 2.0.0 Ready to start TLS\r\n")


def test_next_event_before_the_handshake_is_a_driver_bug() -> None:
    s = server()
    feed(s, b"EHLO c\r\nSTARTTLS\r\n")
    with pytest.raises(ProtocolUsageError):
        s.next_event()
    with pytest.raises(ProtocolUsageError):
        server().tls_started()


def test_starttls_twice_is_503() -> None:
    s = server()
    feed(s, b"EHLO c\r\nSTARTTLS\r\n")
    s.tls_started()
    event, out = feed(s, b"EHLO c\r\nSTARTTLS\r\n")
    assert isinstance(event, NeedData)
    assert out.endswith(b"503 5.5.1 Error: TLS already active\r\n")
    assert s.errors == 1


def test_starttls_with_an_argument_or_inside_a_transaction() -> None:
    s = server()
    _, out = feed(s, b"EHLO c\r\nSTARTTLS now\r\n")
    assert out.endswith(b"501 5.5.4 Syntax: STARTTLS\r\n")
    _, out = feed(s, b"MAIL FROM:<a@x>\r\nSTARTTLS\r\n")
    assert out == b"250 2.1.0 Ok\r\n503 5.5.1 Error: MAIL transaction in progress\r\n"
    _, out = feed(s, b"RSET\r\nSTARTTLS\r\n")
    assert out == b"250 2.0.0 Ok\r\n220 2.0.0 Ready to start TLS\r\n"


def test_required_refuses_mail_before_starttls() -> None:
    s = server("required")
    _, out = feed(s, b"EHLO c\r\n")
    assert b"STARTTLS" in ehlo_keywords(out)
    _, out = feed(s, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n")
    assert out == (
        b"530 5.7.0 Must issue a STARTTLS command first\r\n503 5.5.1 Error: need MAIL command\r\n"
    )
    feed(s, b"STARTTLS\r\n")
    s.tls_started()
    _, out = feed(s, b"EHLO c\r\nMAIL FROM:<a@x>\r\n")
    assert out.endswith(b"250 2.1.0 Ok\r\n")


def test_optional_accepts_mail_without_tls() -> None:
    s = server("optional")
    _, out = feed(s, b"EHLO c\r\nMAIL FROM:<a@x>\r\n")
    assert out.endswith(b"250 2.1.0 Ok\r\n")


_TOKENS = st.sampled_from(
    [
        b"EHLO c\r\n",
        b"HELO c\r\n",
        b"MAIL FROM:<a@x>\r\n",
        b"RCPT TO:<b@y>\r\n",
        b"RSET\r\n",
        b"NOOP\r\n",
        b"STARTTLS\r\n",
        b"STARTTLS\n",
        b"DATA\r\n",
        b"x\r\n.\r\n",
        b"QUIT\r\n",
        b"junk",
    ]
)


@given(before=st.lists(_TOKENS, max_size=6), after=st.lists(_TOKENS, max_size=4))
@settings(max_examples=300, deadline=None)
def test_nothing_after_starttls_in_the_same_read_is_ever_run(
    before: list[bytes], after: list[bytes]
) -> None:
    """Whatever precedes it, a STARTTLS that starts TLS has nothing behind it in the
    buffer; one with bytes behind it ends the session with 554 and runs none of them."""
    s = SmtpServer(ServerSettings(hostname=HOST, tls="optional"))
    s.data_to_send()
    s.receive_data(b"".join(before) + b"STARTTLS\r\n" + b"".join(after))
    while True:
        event = s.next_event()
        if isinstance(event, MessageReceived):
            s.accept_message("Q")
            continue
        break
    out = s.data_to_send()
    if isinstance(event, StartTLS):
        # Only possible when the STARTTLS that was run was the very last line.
        assert out.endswith(b"220 2.0.0 Ready to start TLS\r\n")
        assert s._in == b""
    elif b"554 5.5.1 Error: command pipelined after STARTTLS\r\n" in out:
        assert out.endswith(b"554 5.5.1 Error: command pipelined after STARTTLS\r\n")
        assert isinstance(event, ConnectionClosed) and not s.tls_active
    assert not s.tls_active
