"""The DATA reader of the SMTP server: find a body's end, unstuff it (no trio).

The body is scanned with ``bytes.find`` for ``CRLF.CRLF`` only (never a bare
LF variant: that is the SMTP-smuggling hole) and unstuffed with one
``bytes.replace`` on the whole body, so a body costs O(n) in C, not a Python
loop per line. The size limit applies to the body as transmitted
(dot-stuffed); past it the body is discarded while streaming, only the last
4 bytes kept to find the end.
"""

from __future__ import annotations

import enum
from typing import Literal

__all__ = ["TOO_BIG", "BodyReader", "Oversize", "unstuff"]

_END = b"\r\n.\r\n"
_DOT_END = b".\r\n"
_STUFFED = b"\r\n.."
_UNSTUFFED = b"\r\n."


class Oversize(enum.Enum):
    """The body went past the size limit (it was discarded; answer ``552``)."""

    TOO_BIG = "too big"


TOO_BIG: Literal[Oversize.TOO_BIG] = Oversize.TOO_BIG


class BodyReader:
    """Reads one body at a time from the front of the session's input buffer.

    The buffer is shared with command mode: bytes after the final dot stay in
    it for the next command, and consumed bytes are deleted from its front
    (O(1) for a bytearray), so pipelined transactions cost O(n).
    """

    __slots__ = ("_discarding", "_scan", "limit")

    def __init__(self, limit: int) -> None:
        #: Largest body accepted, as transmitted (dot-stuffed, with its last CRLF).
        self.limit = limit
        #: Where to resume looking for the end marker (keeps long bodies O(n)).
        self._scan = 0
        self._discarding = False

    def start(self) -> None:
        """A new body begins at the front of the buffer (after ``354``)."""
        self._scan = 0
        self._discarding = False

    def read(self, buf: bytearray) -> bytes | Literal[Oversize.TOO_BIG] | None:
        """The body as transmitted (dot-stuffed, last CRLF kept) once its end is in
        ``buf``; ``TOO_BIG`` once the end of an oversized body is; else None."""
        # "." alone on the first line: an empty message (no CRLF precedes it).
        if not self._discarding and buf.startswith(_DOT_END):
            del buf[: len(_DOT_END)]
            return b""
        idx = buf.find(_END, self._scan)
        if idx < 0:
            # A later end marker starts at len - 4 or after, so the body (which
            # keeps the marker's CRLF) is at least len - 2 bytes.
            self._scan = max(len(buf) - 4, 0)
            if self._discarding or len(buf) - 2 > self.limit:
                self._discarding = True
                del buf[: max(len(buf) - 4, 0)]
                self._scan = 0
            return None
        if self._discarding or idx + 2 > self.limit:
            del buf[: idx + len(_END)]
            return TOO_BIG
        with memoryview(buf) as view, view[: idx + 2] as part:
            body = part.tobytes()
        del buf[: idx + len(_END)]
        return body


def unstuff(body: bytes) -> bytes:
    """Undo dot-stuffing (RFC 5321 section 4.5.2): a line's leading ``..`` becomes ``.``."""
    if body.startswith(b".."):
        body = body[1:]
    if _STUFFED in body:
        body = body.replace(_STUFFED, _UNSTUFFED)
    return body
