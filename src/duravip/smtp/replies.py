"""Reply lines of the SMTP server: their wire format and the fixed texts (no trio).

Every reply is built from its arguments only, never from how the input was
chunked, so the same bytes in always give the same bytes out.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "HELP_TEXT",
    "OK",
    "OK_RECIPIENT",
    "OK_SENDER",
    "READY_FOR_TLS",
    "START_MAIL_INPUT",
    "ehlo_reply",
    "greeting",
    "raw_line",
    "reply",
    "session_expired",
    "shutting_down",
    "timed_out",
    "too_many_connections",
    "too_many_errors",
]

HELP_TEXT = "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP (see RFC 5321)"


def reply(code: int, enhanced: str, text: str) -> bytes:
    """``<code> <enhanced status> <text>`` CRLF (RFC 2034 enhanced status codes)."""
    return f"{code} {enhanced} {text}\r\n".encode("utf-8", "replace")


def raw_line(line: str) -> bytes:
    """A reply line given whole (no enhanced code: banner, HELO, 354, 421s)."""
    return line.encode("utf-8", "replace") + b"\r\n"


#: The replies of every transaction, encoded once (the hot path appends them as is).
OK = reply(250, "2.0.0", "Ok")
OK_SENDER = reply(250, "2.1.0", "Ok")
OK_RECIPIENT = reply(250, "2.1.5", "Ok")
START_MAIL_INPUT = raw_line("354 End data with <CR><LF>.<CR><LF>")
READY_FOR_TLS = reply(220, "2.0.0", "Ready to start TLS")


def greeting(hostname: str) -> bytes:
    return raw_line(f"220 {hostname} ESMTP duravip")


def ehlo_reply(hostname: str, keywords: Sequence[str]) -> bytes:
    """The multi-line ``250`` to EHLO: ``250-`` on every line but the last."""
    lines = [hostname, *keywords]
    last = len(lines) - 1
    return "".join(
        f"250{' ' if i == last else '-'}{text}\r\n" for i, text in enumerate(lines)
    ).encode("utf-8", "replace")


def too_many_connections(hostname: str) -> bytes:
    """The whole reply to a connection over a session cap (sent instead of the banner)."""
    return f"421 4.7.0 {hostname} Error: too many connections, try again later\r\n".encode(
        "utf-8", "replace"
    )


def too_many_errors(hostname: str) -> bytes:
    return raw_line(f"421 4.7.0 {hostname} Error: too many errors")


def shutting_down(hostname: str) -> bytes:
    return raw_line(f"421 4.3.2 {hostname} Service shutting down")


def timed_out(hostname: str) -> bytes:
    return raw_line(f"421 4.4.2 {hostname} Error: timeout exceeded")


def session_expired(hostname: str) -> bytes:
    """The session lasted ``session_timeout`` in all, however busy it was."""
    return raw_line(f"421 4.4.2 {hostname} Error: session time limit exceeded")
