"""Sans-IO SMTP server state machine (RFC 5321 with RFC 1870, 1652, 2034, 2920).

Bytes in (:meth:`SmtpServer.receive_data`), events out
(:meth:`SmtpServer.next_event`), reply bytes out
(:meth:`SmtpServer.data_to_send`), in the style of h11: no I/O and no trio here,
so every protocol path is testable byte for byte and the same core serves the
plain listeners and the mmove channel.

Design choices that matter for speed and safety:

* DATA is scanned with ``bytes.find`` for ``CRLF.CRLF`` only (never a bare LF
  variant: that is the SMTP-smuggling hole) and unstuffed with one
  ``bytes.replace`` on the whole body, so the body costs O(n) in C, not a
  Python loop per line.
* The size limit applies to the body as transmitted (dot-stuffed); past it the
  body is discarded while streaming (only the last 4 bytes are kept to find the
  end) and ``552`` is sent after the final dot.
* A body holding a bare LF or CR is refused with ``550 5.5.2`` (the session
  goes on) or, with ``bare_newline = normalize``, rewritten to CRLF: the sink
  only ever gets canonical CRLF, so no later hop can be smuggled a command.
* Reply text never depends on how the input was chunked: the same bytes give
  the same replies whether they arrive at once or one at a time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

from attrs import Factory, field, frozen

from duravip.config import SmtpLimits
from duravip.smtp.newlines import has_bare_newline, to_crlf
from duravip.smtp.types import Envelope

__all__ = [
    "ConnectionClosed",
    "Event",
    "MessageReceived",
    "NeedData",
    "ServerSettings",
    "SmtpServer",
    "too_many_connections",
]

_END = b"\r\n.\r\n"
_DOT_END = b".\r\n"
_STUFFED = b"\r\n.."
_UNSTUFFED = b"\r\n."
_CRLF = b"\r\n"
#: Characters never valid in an unquoted path: controls, space, DEL, brackets.
_BAD_ADDR_CHAR = re.compile(r"[\x00-\x20\x7f<>]")


_DEFAULT_LIMITS = SmtpLimits()


def _upper_set(names: Iterable[str]) -> frozenset[str]:
    return frozenset(n.upper() for n in names)


@frozen
class ServerSettings:
    """What a listener tells the state machine: its name, limits and extensions."""

    hostname: str
    limits: SmtpLimits = _DEFAULT_LIMITS
    #: MAIL FROM parameters accepted besides SIZE and BODY (matched upper-cased).
    extra_mail_params: frozenset[str] = field(default=frozenset(), converter=_upper_set)
    #: Extra EHLO keywords (e.g. ``"XMMOVE"``), advertised after the standard ones.
    extra_ehlo: tuple[str, ...] = ()


@frozen
class NeedData:
    """Nothing more can happen until :meth:`SmtpServer.receive_data` is called."""


@frozen
class ConnectionClosed:
    """The session is over (QUIT, 421, EOF): flush :meth:`data_to_send` and close."""


@frozen
class MessageReceived:
    """A complete transaction; answer with ``accept_message`` or ``reject_message``."""

    mail_from: str
    rcpt_to: tuple[str, ...]
    #: Dot-unstuffed body with CRLF line endings, without the final ``.``.
    data: bytes
    helo: str = ""
    mail_params: Mapping[str, str] = Factory(dict)

    def envelope(self, peer: tuple[str, int], local: tuple[str, int]) -> Envelope:
        return Envelope(
            mail_from=self.mail_from,
            rcpt_to=self.rcpt_to,
            data=self.data,
            helo=self.helo,
            peer=peer,
            local=local,
            mail_params=dict(self.mail_params),
        )


Event = NeedData | ConnectionClosed | MessageReceived

_NEED_DATA = NeedData()
_CLOSED = ConnectionClosed()

# Connection states.
_COMMAND = "command"
_DATA = "data"
_DECISION = "decision"
_CLOSED_STATE = "closed"

_HELP = "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP (see RFC 5321)"
#: Commands we recognise but do not implement: 502, not 500.
_UNIMPLEMENTED = frozenset(
    {"EXPN", "TURN", "ETRN", "AUTH", "STARTTLS", "BDAT", "ATRN", "SEND", "SOML", "SAML"}
)


def too_many_connections(hostname: str) -> bytes:
    """The whole reply to a connection over a session cap (sent instead of the banner)."""
    return f"421 4.7.0 {hostname} Error: too many connections, try again later\r\n".encode(
        "utf-8", "replace"
    )


class ProtocolUsageError(RuntimeError):
    """The caller used the state machine out of order (a driver bug, not a client one)."""


def _parse_path(text: str) -> tuple[str, str] | None:
    """Split ``<addr> params`` into (addr, params); None on bad syntax.

    Brackets are optional (lenient, like most MTAs); a source route
    (``<@a,@b:user@d>``) is dropped as RFC 5321 section 4.1.1.3 asks.
    """
    text = text.lstrip(" ")
    if text.startswith("<"):
        end = text.find(">")
        if end < 0:
            return None
        addr, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(" "):
            return None
    else:
        addr, _, rest = text.partition(" ")
    if addr.startswith("@"):
        colon = addr.find(":")
        if colon < 0:
            return None
        addr = addr[colon + 1 :]
    if not addr.isascii() or _BAD_ADDR_CHAR.search(addr):
        return None
    return addr, rest.strip(" ")


class SmtpServer:
    """One SMTP session's protocol state. Not thread-safe; one per connection."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self._limits = settings.limits
        self._host = settings.hostname
        self._out: list[bytes] = []
        self._in = bytearray()
        #: Where to resume looking for LF in ``_in`` (keeps long partial lines O(n)).
        self._line_scan = 0
        #: True while skipping the rest of an over-long command line.
        self._skipping = False
        self._state = _COMMAND
        # DATA: the body is read in place from the front of ``_in`` (deleting
        # from a bytearray's front is O(1)), so pipelined transactions cost O(n).
        self._data_scan = 0
        self._discarding = False
        self._eof = False
        self.errors = 0
        #: Bodies with a bare LF/CR refused, or rewritten to CRLF (``bare_newline``).
        self.bare_newline_rejects = 0
        self.bare_newline_normalized = 0
        self.helo: str | None = None
        self.esmtp = False
        self._reset_transaction()
        self._send_raw(f"220 {self._host} ESMTP duravip")

    # ------------------------------------------------------------------ API

    @property
    def in_data(self) -> bool:
        """True while receiving a message body (the driver uses the data timeout)."""
        return self._state == _DATA

    @property
    def in_transaction(self) -> bool:
        """True from an accepted MAIL until the transaction is answered or reset."""
        return self._state in (_DATA, _DECISION) or self._mail_from is not None

    @property
    def closed(self) -> bool:
        return self._state == _CLOSED_STATE

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes from the client; ``b""`` means the client closed its side."""
        if self._state == _CLOSED_STATE:
            return
        if not data:
            self._eof = True
        else:
            self._in += data

    def data_to_send(self) -> bytes:
        """Replies queued so far (possibly several, in order); empties the queue."""
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event:
        """Process buffered input until an event is due; replies go to the out queue."""
        if self._state == _DECISION:
            raise ProtocolUsageError("accept_message() or reject_message() first")
        while True:
            state = self._state
            if state == _CLOSED_STATE:
                return _CLOSED
            # Command mode hands over to data mode at the 354 boundary and back
            # after a rejected body, so loop until a mode makes no progress.
            event = self._process_command() if state == _COMMAND else self._process_data()
            if event is not None:
                return event
            if self._state == state:
                break
        if self._eof:
            self._close()
            return _CLOSED
        return _NEED_DATA

    def accept_message(self, queue_id: str) -> None:
        """The sink made the message durable: ``250`` with its queue id."""
        self._decide()
        self._reply(250, "2.0.0", f"Ok: queued as {queue_id}")

    def reject_message(self, code: int, enhanced: str, text: str) -> None:
        """The sink refused the message (4xx or 5xx); the session continues."""
        if not 400 <= code <= 599:
            raise ValueError(f"reject code must be 4xx or 5xx, not {code}")
        self._decide()
        self._reply(code, enhanced, text)

    def shutdown(self) -> None:
        """Queue ``421 4.3.2`` and close (the daemon is stopping or the IP is leaving)."""
        if self._state == _CLOSED_STATE:
            return
        self._send_raw(f"421 4.3.2 {self._host} Service shutting down")
        self._close()

    def timeout(self) -> None:
        """The client was idle too long: ``421 4.4.2`` and close."""
        if self._state == _CLOSED_STATE:
            return
        self._send_raw(f"421 4.4.2 {self._host} Error: timeout exceeded")
        self._close()

    # ------------------------------------------------------------ internals

    def _send_raw(self, line: str) -> None:
        self._out.append(line.encode("utf-8", "replace") + _CRLF)

    def _reply(self, code: int, enhanced: str, text: str) -> None:
        self._out.append(f"{code} {enhanced} {text}\r\n".encode("utf-8", "replace"))

    def _error(self, code: int, enhanced: str, text: str) -> None:
        """A client error: reply, count it, and hang up after too many."""
        self._reply(code, enhanced, text)
        self.errors += 1
        if self.errors >= self._limits.max_errors:
            self._send_raw(f"421 4.7.0 {self._host} Error: too many errors")
            self._close()

    def _close(self) -> None:
        self._state = _CLOSED_STATE
        self._in = bytearray()

    def _reset_transaction(self) -> None:
        self._mail_from: str | None = None
        self._mail_params: dict[str, str] = {}
        self._rcpts: list[str] = []
        self._rcpt_attempted = False

    def _decide(self) -> None:
        if self._state != _DECISION:
            raise ProtocolUsageError("no message is waiting for a decision")
        self._state = _COMMAND
        self._reset_transaction()

    # -------------------------------------------------------- command mode

    def _process_command(self) -> Event | None:
        """Handle every complete command line in the buffer, in order."""
        max_len = self._limits.max_line_length
        while self._state == _COMMAND:
            buf = self._in
            nl = buf.find(b"\n", self._line_scan)
            if nl < 0:
                if self._skipping:
                    buf.clear()
                    self._line_scan = 0
                    return None
                self._line_scan = len(buf)
                pending = len(buf) - (1 if buf.endswith(b"\r") else 0)
                if pending > max_len - 2:
                    # Too long whatever follows: answer now, drop through the LF.
                    buf.clear()
                    self._line_scan = 0
                    self._skipping = True
                    self._error(500, "5.5.6", "Error: line too long")
                return None
            raw = bytes(buf[:nl])
            del buf[: nl + 1]
            self._line_scan = 0
            if self._skipping:
                self._skipping = False
                continue
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if len(raw) > max_len - 2:
                self._error(500, "5.5.6", "Error: line too long")
                continue
            self._command(raw.decode("latin-1"))
            if self._state == _DATA:
                # Bytes after "DATA\r\n" are the body (the 354 boundary).
                self._data_scan = 0
                self._discarding = False
                return None
        return None

    def _command(self, line: str) -> None:
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        handler = self._HANDLERS.get(verb)
        if handler is not None:
            handler(self, arg.strip(" "))
        elif verb in _UNIMPLEMENTED:
            self._error(502, "5.5.1", "Error: command not implemented")
        else:
            self._error(500, "5.5.2", "Error: command not recognized")

    def _ehlo(self, arg: str) -> None:
        if not arg:
            self._error(501, "5.5.4", "Syntax: EHLO hostname")
            return
        self._reset_transaction()
        self.helo, self.esmtp = arg, True
        lines = [
            self._host,
            "PIPELINING",
            f"SIZE {self._limits.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            *self.settings.extra_ehlo,
        ]
        last = len(lines) - 1
        self._out.append(
            "".join(
                f"250{' ' if i == last else '-'}{text}\r\n" for i, text in enumerate(lines)
            ).encode("utf-8", "replace")
        )

    def _helo(self, arg: str) -> None:
        if not arg:
            self._error(501, "5.5.4", "Syntax: HELO hostname")
            return
        self._reset_transaction()
        self.helo, self.esmtp = arg, False
        self._send_raw(f"250 {self._host}")

    def _mail(self, arg: str) -> None:
        if self.helo is None:
            self._error(503, "5.5.1", "Error: send HELO/EHLO first")
            return
        if self._mail_from is not None:
            self._error(503, "5.5.1", "Error: nested MAIL command")
            return
        if arg[:5].upper() != "FROM:":
            self._error(501, "5.5.4", "Syntax: MAIL FROM:<address>")
            return
        parsed = _parse_path(arg[5:])
        if parsed is None:
            self._error(501, "5.1.7", "Bad sender address syntax")
            return
        addr, rest = parsed
        params: dict[str, str] = {}
        for token in rest.split():
            key, eq, value = token.partition("=")
            key = key.upper()
            if key in params:
                self._error(501, "5.5.4", f"Error: duplicate {key} parameter")
                return
            if key == "SIZE":
                if not (eq and value.isdigit() and value.isascii()):
                    self._error(501, "5.5.4", "Error: bad SIZE parameter")
                    return
                if int(value) > self._limits.max_message_size:
                    self._reply(552, "5.3.4", "Error: message size exceeds fixed limit")
                    return
            elif key == "BODY":
                value = value.upper()
                if value not in ("7BIT", "8BITMIME"):
                    self._error(501, "5.5.4", "Error: BODY must be 7BIT or 8BITMIME")
                    return
            elif key not in self.settings.extra_mail_params:
                self._error(555, "5.5.4", f"Error: unsupported parameter {key}")
                return
            params[key] = value
        self._mail_from = addr
        self._mail_params = params
        self._reply(250, "2.1.0", "Ok")

    def _rcpt(self, arg: str) -> None:
        if self._mail_from is None:
            self._error(503, "5.5.1", "Error: need MAIL command")
            return
        self._rcpt_attempted = True
        if arg[:3].upper() != "TO:":
            self._error(501, "5.5.4", "Syntax: RCPT TO:<address>")
            return
        parsed = _parse_path(arg[3:])
        if parsed is None or not parsed[0]:
            self._error(501, "5.1.3", "Bad recipient address syntax")
            return
        addr, rest = parsed
        if rest:
            self._error(555, "5.5.4", "Error: unsupported RCPT parameter")
            return
        if len(self._rcpts) >= self._limits.max_recipients:
            self._reply(452, "4.5.3", "Error: too many recipients")
            return
        self._rcpts.append(addr)
        self._reply(250, "2.1.5", "Ok")

    def _data_cmd(self, arg: str) -> None:
        if arg:
            self._error(501, "5.5.4", "Syntax: DATA")
        elif self._mail_from is None:
            self._error(503, "5.5.1", "Error: need MAIL command")
        elif not self._rcpts:
            if self._rcpt_attempted:
                self._error(554, "5.5.1", "Error: no valid recipients")
            else:
                self._error(503, "5.5.1", "Error: need RCPT command")
        else:
            self._send_raw("354 End data with <CR><LF>.<CR><LF>")
            self._state = _DATA

    def _rset(self, arg: str) -> None:
        if arg:
            self._error(501, "5.5.4", "Syntax: RSET")
            return
        self._reset_transaction()
        self._reply(250, "2.0.0", "Ok")

    def _noop(self, arg: str) -> None:
        self._reply(250, "2.0.0", "Ok")

    def _quit(self, arg: str) -> None:
        if arg:
            self._error(501, "5.5.4", "Syntax: QUIT")
            return
        self._reply(221, "2.0.0", "Bye")
        self._close()

    def _vrfy(self, arg: str) -> None:
        if not arg:
            self._error(501, "5.5.4", "Syntax: VRFY address")
            return
        self._reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")

    def _help(self, arg: str) -> None:
        self._reply(214, "2.0.0", _HELP)

    _HANDLERS: Mapping[str, Callable[[SmtpServer, str], None]] = {
        "EHLO": _ehlo,
        "HELO": _helo,
        "MAIL": _mail,
        "RCPT": _rcpt,
        "DATA": _data_cmd,
        "RSET": _rset,
        "NOOP": _noop,
        "QUIT": _quit,
        "VRFY": _vrfy,
        "HELP": _help,
    }

    # ----------------------------------------------------------- data mode

    def _process_data(self) -> Event | None:
        """Look for the end of the body at the front of ``_in`` (one C-level find)."""
        buf = self._in
        limit = self._limits.max_message_size
        # "." alone on the first line: an empty message (no CRLF precedes it).
        if not self._discarding and buf.startswith(_DOT_END):
            del buf[: len(_DOT_END)]
            return self._message(b"")
        idx = buf.find(_END, self._data_scan)
        if idx < 0:
            # A later end marker starts at len - 4 or after, so the body (which
            # keeps the marker's CRLF) is at least len - 2 bytes.
            self._data_scan = max(len(buf) - 4, 0)
            if self._discarding or len(buf) - 2 > limit:
                self._discarding = True
                del buf[: max(len(buf) - 4, 0)]
                self._data_scan = 0
            return None
        if self._discarding or idx + 2 > limit:
            del buf[: idx + len(_END)]
            self._state = _COMMAND
            self._reset_transaction()
            self._reply(552, "5.3.4", "Error: message size exceeds fixed limit")
            return None
        with memoryview(buf) as view, view[: idx + 2] as part:
            body = part.tobytes()
        del buf[: idx + len(_END)]
        if has_bare_newline(body):
            if self._limits.bare_newline == "reject":
                self.bare_newline_rejects += 1
                self._state = _COMMAND
                self._reset_transaction()
                self._reply(550, "5.5.2", "Error: bare <LF> or <CR> in message, send <CR><LF>")
                return None
            self.bare_newline_normalized += 1
            body = to_crlf(body)
        if body.startswith(b".."):
            body = body[1:]
        if _STUFFED in body:
            body = body.replace(_STUFFED, _UNSTUFFED)
        return self._message(body)

    def _message(self, body: bytes) -> MessageReceived:
        assert self._mail_from is not None
        self._state = _DECISION
        return MessageReceived(
            mail_from=self._mail_from,
            rcpt_to=tuple(self._rcpts),
            data=body,
            helo=self.helo or "",
            mail_params=self._mail_params,
        )
