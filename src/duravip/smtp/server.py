"""Sans-IO SMTP server state machine (RFC 5321 with RFC 1870, 1652, 2034, 2920, 3207).

Bytes in (:meth:`SmtpServer.receive_data`), events out
(:meth:`SmtpServer.next_event`), reply bytes out
(:meth:`SmtpServer.data_to_send`), in the style of h11: no I/O and no trio here,
so every protocol path is testable byte for byte and the same core serves the
plain listeners and the mmove channel.

This module is the state machine (modes, transaction state, the order of the
checks); the rest is split by concern and re-exported here:
:mod:`~duravip.smtp.settings` (its own settings, no config import),
:mod:`~duravip.smtp.events`, :mod:`~duravip.smtp.parsing` (command
arguments), :mod:`~duravip.smtp.replies` (reply texts) and
:mod:`~duravip.smtp.body` (the DATA reader).

Design choices that matter for speed and safety:

* DATA is scanned for ``CRLF.CRLF`` only and unstuffed in C (see ``body``).
* The size limit applies to the body as transmitted (dot-stuffed); past it the
  body is discarded while streaming and ``552`` is sent after the final dot.
* A body holding a bare LF or CR is refused with ``550 5.5.2`` (the session
  goes on) or, with ``bare_newline = normalize``, rewritten to CRLF: the sink
  only ever gets canonical CRLF, so no later hop can be smuggled a command.
* Reply text never depends on how the input was chunked: the same bytes give
  the same replies whether they arrive at once or one at a time. The one
  exception is STARTTLS: bytes already buffered behind it are refused (below).
* STARTTLS (RFC 3207): the core only answers ``220`` and returns
  :class:`StartTLS`; the driver runs the handshake and calls
  :meth:`SmtpServer.tls_started`, which forgets everything the client said
  before (EHLO again; no MAIL carried over). Bytes the client sent after the
  STARTTLS line before the handshake (plaintext a man in the middle could have
  injected, CVE-2011-0411) are never run: the session is answered ``554`` and
  closed instead of starting TLS.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from duravip.smtp.body import TOO_BIG, BodyReader, unstuff
from duravip.smtp.events import (
    CLOSED,
    NEED_DATA,
    START_TLS,
    ConnectionClosed,
    Event,
    MessageReceived,
    NeedData,
    StartTLS,
)
from duravip.smtp.newlines import has_bare_newline, to_crlf
from duravip.smtp.parsing import (
    UNIMPLEMENTED,
    Refusal,
    parse_mail_from,
    parse_rcpt_to,
    split_command,
)
from duravip.smtp.replies import (
    HELP_TEXT,
    OK,
    OK_RECIPIENT,
    OK_SENDER,
    READY_FOR_TLS,
    START_MAIL_INPUT,
    ehlo_reply,
    greeting,
    raw_line,
    reply,
    session_expired,
    shutting_down,
    timed_out,
    too_many_connections,
    too_many_errors,
)
from duravip.smtp.settings import ServerSettings, SessionLimits

__all__ = [
    "ConnectionClosed",
    "Event",
    "MessageReceived",
    "NeedData",
    "ProtocolUsageError",
    "ServerSettings",
    "SessionLimits",
    "SmtpServer",
    "StartTLS",
    "too_many_connections",
]

# Connection states.
_COMMAND = "command"
_DATA = "data"
_DECISION = "decision"
#: ``220 Ready to start TLS`` sent; waiting for the driver's handshake.
_TLS_PENDING = "starttls"
_CLOSED_STATE = "closed"


class ProtocolUsageError(RuntimeError):
    """The caller used the state machine out of order (a driver bug, not a client one)."""


class SmtpServer:
    """One SMTP session's protocol state. Not thread-safe; one per connection."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self._limits: SessionLimits = settings.limits
        self._host = settings.hostname
        self._out: list[bytes] = []
        self._in = bytearray()
        #: Where to resume looking for LF in ``_in`` (keeps long partial lines O(n)).
        self._line_scan = 0
        #: True while skipping the rest of an over-long command line.
        self._skipping = False
        self._state = _COMMAND
        # DATA: the body is read in place from the front of ``_in``.
        self._body = BodyReader(self._limits.max_message_size)
        self._eof = False
        self.errors = 0
        #: Bodies with a bare LF/CR refused, or rewritten to CRLF (``bare_newline``).
        self.bare_newline_rejects = 0
        self.bare_newline_normalized = 0
        self.helo: str | None = None
        self.esmtp = False
        #: True once the driver completed the TLS handshake (never goes back).
        self.tls_active = False
        #: Sessions closed because bytes followed STARTTLS before the handshake.
        self.starttls_pipelining_rejects = 0
        self._reset_transaction()
        self._out.append(greeting(self._host))

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

    @property
    def tls_available(self) -> bool:
        """STARTTLS is offered on this session now (a mode allows it, not yet active)."""
        return self.settings.tls != "off" and not self.tls_active

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
        if self._state == _TLS_PENDING:
            raise ProtocolUsageError("tls_started() first, or close the connection")
        while True:
            state = self._state
            if state == _CLOSED_STATE:
                return CLOSED
            # Command mode hands over to data mode at the 354 boundary and back
            # after a rejected body, so loop until a mode makes no progress.
            event = self._process_command() if state == _COMMAND else self._process_data()
            if event is not None:
                return event
            if self._state == state:
                break
        if self._eof:
            self._close()
            return CLOSED
        return NEED_DATA

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

    def tls_started(self) -> None:
        """The driver completed the TLS handshake: back to the initial state (RFC 3207 4.2).

        No banner follows; the client must EHLO again, and nothing it said
        before (HELO name, extensions) is kept. The error count is kept.
        """
        if self._state != _TLS_PENDING:
            raise ProtocolUsageError("no STARTTLS is waiting for a handshake")
        self.tls_active = True
        # Empty already (bytes behind STARTTLS end the session); cleared again so
        # that no plaintext byte can ever be read as if it came over TLS.
        self._in = bytearray()
        self._line_scan = 0
        self.helo, self.esmtp = None, False
        self._reset_transaction()
        self._state = _COMMAND

    def shutdown(self) -> None:
        """Queue ``421 4.3.2`` and close (the daemon is stopping or the IP is leaving)."""
        if self._state == _CLOSED_STATE:
            return
        self._out.append(shutting_down(self._host))
        self._close()

    def timeout(self, *, session: bool = False) -> None:
        """The client was idle too long (or, ``session``, the whole session was): ``421 4.4.2``."""
        if self._state == _CLOSED_STATE:
            return
        self._out.append(session_expired(self._host) if session else timed_out(self._host))
        self._close()

    # ------------------------------------------------------------ internals

    def _reply(self, code: int, enhanced: str, text: str) -> None:
        self._out.append(reply(code, enhanced, text))

    def _error(self, code: int, enhanced: str, text: str) -> None:
        """A client error: reply, count it, and hang up after too many."""
        self._reply(code, enhanced, text)
        self.errors += 1
        if self.errors >= self._limits.max_errors:
            self._out.append(too_many_errors(self._host))
            self._close()

    def _refuse(self, refusal: Refusal) -> None:
        if refusal.is_error:
            self._error(refusal.code, refusal.enhanced, refusal.text)
        else:
            self._reply(refusal.code, refusal.enhanced, refusal.text)

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

    def _process_command(self) -> StartTLS | None:
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
            if self._state == _TLS_PENDING:
                return START_TLS
            if self._state == _DATA:
                # Bytes after "DATA\r\n" are the body (the 354 boundary).
                self._body.start()
                return None
        return None

    def _command(self, line: str) -> None:
        verb, arg = split_command(line)
        handler = self._HANDLERS.get(verb)
        if handler is not None:
            handler(self, arg)
        elif verb in UNIMPLEMENTED:
            self._error(502, "5.5.1", "Error: command not implemented")
        else:
            self._error(500, "5.5.2", "Error: command not recognized")

    def _ehlo(self, arg: str) -> None:
        if not arg:
            self._error(501, "5.5.4", "Syntax: EHLO hostname")
            return
        self._reset_transaction()
        self.helo, self.esmtp = arg, True
        keywords = (
            "PIPELINING",
            f"SIZE {self._limits.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            *(("STARTTLS",) if self.tls_available else ()),
            *self.settings.extra_ehlo,
        )
        self._out.append(ehlo_reply(self._host, keywords))

    def _helo(self, arg: str) -> None:
        if not arg:
            self._error(501, "5.5.4", "Syntax: HELO hostname")
            return
        self._reset_transaction()
        self.helo, self.esmtp = arg, False
        self._out.append(raw_line(f"250 {self._host}"))

    def _mail(self, arg: str) -> None:
        if self.settings.tls == "required" and not self.tls_active:
            self._error(530, "5.7.0", "Must issue a STARTTLS command first")
            return
        if self.helo is None:
            self._error(503, "5.5.1", "Error: send HELO/EHLO first")
            return
        if self._mail_from is not None:
            self._error(503, "5.5.1", "Error: nested MAIL command")
            return
        parsed = parse_mail_from(
            arg,
            max_size=self._limits.max_message_size,
            extra_params=self.settings.extra_mail_params,
        )
        if isinstance(parsed, Refusal):
            self._refuse(parsed)
            return
        addr, params = parsed
        self._mail_from = addr
        self._mail_params = params
        self._out.append(OK_SENDER)

    def _rcpt(self, arg: str) -> None:
        if self._mail_from is None:
            self._error(503, "5.5.1", "Error: need MAIL command")
            return
        self._rcpt_attempted = True
        addr = parse_rcpt_to(arg)
        if isinstance(addr, Refusal):
            self._refuse(addr)
            return
        if len(self._rcpts) >= self._limits.max_recipients:
            self._reply(452, "4.5.3", "Error: too many recipients")
            return
        self._rcpts.append(addr)
        self._out.append(OK_RECIPIENT)

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
            self._out.append(START_MAIL_INPUT)
            self._state = _DATA

    def _rset(self, arg: str) -> None:
        if arg:
            self._error(501, "5.5.4", "Syntax: RSET")
            return
        self._reset_transaction()
        self._out.append(OK)

    def _noop(self, arg: str) -> None:
        self._out.append(OK)

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

    def _starttls(self, arg: str) -> None:
        if self.settings.tls == "off":
            self._error(502, "5.5.1", "Error: command not implemented")
        elif self.tls_active:
            self._error(503, "5.5.1", "Error: TLS already active")
        elif arg:
            self._error(501, "5.5.4", "Syntax: STARTTLS")
        elif self._mail_from is not None:
            self._error(503, "5.5.1", "Error: MAIL transaction in progress")
        elif self._in:
            # Plaintext behind STARTTLS would be read as if sent over TLS: refuse
            # it all rather than run a command a man in the middle may have added.
            self.starttls_pipelining_rejects += 1
            self._reply(554, "5.5.1", "Error: command pipelined after STARTTLS")
            self._close()
        else:
            self._out.append(READY_FOR_TLS)
            self._state = _TLS_PENDING

    def _help(self, arg: str) -> None:
        self._reply(214, "2.0.0", HELP_TEXT)

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
        "STARTTLS": _starttls,
    }

    # ----------------------------------------------------------- data mode

    def _process_data(self) -> Event | None:
        """Look for the end of the body at the front of ``_in`` (one C-level find)."""
        body = self._body.read(self._in)
        if body is None:
            return None
        if body is TOO_BIG:
            self._state = _COMMAND
            self._reset_transaction()
            self._reply(552, "5.3.4", "Error: message size exceeds fixed limit")
            return None
        if has_bare_newline(body):
            if self._limits.bare_newline == "reject":
                self.bare_newline_rejects += 1
                self._state = _COMMAND
                self._reset_transaction()
                self._reply(550, "5.5.2", "Error: bare <LF> or <CR> in message, send <CR><LF>")
                return None
            self.bare_newline_normalized += 1
            body = to_crlf(body)
        return self._message(unstuff(body))

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
