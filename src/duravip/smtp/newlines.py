"""Line endings of message bodies: the SMTP smuggling defences, in and out (no trio).

SMTP ends a body only at ``CRLF . CRLF``, but some receivers also end it at
``LF . LF``, ``LF . CRLF`` or ``CR . CR``: a body carrying such a sequence can
end the message early there and smuggle the bytes after it in as commands
(the 2023 "SMTP smuggling" disclosures). Inbound, a body with a bare LF or CR
is refused or rewritten (``bare_newline``); outbound, every body is written
with canonical CRLF and dot-stuffed, so whatever a spool holds reaches the
next hop as exactly one message. Each function is a few ``bytes`` methods
(C loops), never a Python loop per line.
"""

from __future__ import annotations

__all__ = ["has_bare_newline", "to_crlf", "wire_body"]


def has_bare_newline(data: bytes) -> bool:
    """True if ``data`` holds an LF not preceded by CR, or a CR not followed by LF."""
    crlf = data.count(b"\r\n")
    return data.count(b"\n") != crlf or data.count(b"\r") != crlf


def to_crlf(data: bytes) -> bytes:
    """Every bare LF, bare CR and CRLF becomes CRLF (``CR CR LF`` is two line ends)."""
    if not has_bare_newline(data):
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def wire_body(data: bytes) -> bytes:
    """``data`` as sent after ``DATA``: canonical CRLF, dot-stuffed, ending ``CRLF . CRLF``."""
    body = to_crlf(data)
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    if body.startswith(b"."):
        body = b"." + body
    return body.replace(b"\r\n.", b"\r\n..") + b".\r\n"
