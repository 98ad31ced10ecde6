"""Outbound SMTP over a Trio stream, driving smtpproto's sans-IO client.

Why not ``smtpproto.client.AsyncSMTPClient``: it connects with
``anyio.connect_tcp`` and offers no source address, and delivery must leave
from the binding's ``Bind_Address``. So we open the socket ourselves and drive
``SMTPClientProtocol``. Three small additions, in a subclass: ESMTP parameters on
``MAIL FROM`` (mmove's ``XBINDING=``/``XMMOVEID=``), a 4xx/5xx after the
data turned into a response instead of a protocol violation, and the body
written by :func:`duravip.smtp.newlines.wire_body`: never re-encoded by the
``email`` package, but always canonical CRLF and dot-stuffed, so a stored body
with a bare LF or CR (``x LF . CRLF MAIL FROM:...``) cannot end the message
early at the next hop and smuggle commands in (the downstream half of SMTP
smuggling).
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Sequence
from typing import Any

import trio
from attrs import frozen
from smtpproto.protocol import (
    ClientState,
    SMTPClientProtocol,
    SMTPException,
    SMTPResponse,
)

from duravip.smtp.newlines import wire_body


class SmtpError(Exception):
    """The session broke (connection, timeout or protocol); every unsent message is deferred."""

    #: It broke after the whole message was written, before its reply: the server may
    #: have taken it (a resend may duplicate it).
    after_data: bool = False


class _Protocol(SMTPClientProtocol):
    def mail_with(self, sender: str, params: Sequence[str]) -> None:
        """``MAIL FROM`` with extra ESMTP parameters (``smtpproto`` has no hook for them)."""
        self._require_state(ClientState.ready, ClientState.authenticated)
        args = ["BODY=8BITMIME"] if "8BITMIME" in self.extensions else []
        args.extend(params)
        self._smtputf8_message = False
        self._send_command("MAIL", b"FROM:<" + self._encode_address(sender) + b">", *args)

    def data_raw(self, raw: bytes) -> None:
        """The message as stored, sent canonical (``smtpproto.data`` wants an EmailMessage)."""
        self._require_state(ClientState.send_data)
        self._out_buffer += wire_body(raw)
        self._state = ClientState.data_sent

    def _parse_response(self, code: int, lines: Sequence[str]) -> SMTPResponse | None:
        if self._command_sent is None and self._state is ClientState.data_sent and code >= 400:
            self._state = ClientState.ready
            return SMTPResponse(code, "\n".join(lines))
        return super()._parse_response(code, lines)


@frozen
class SendResult:
    """Outcome of one transaction: ``code`` is the final reply (MAIL, DATA or end of data)."""

    code: int
    message: str
    accepted: tuple[str, ...]
    #: Recipients refused with a 4xx (retry) and a 5xx (bounce), with the reply.
    deferred: tuple[tuple[str, str], ...]
    rejected: tuple[tuple[str, str], ...]


async def open_tcp(
    host: str, port: int, *, bind: str | None = None, timeout: float = 30.0
) -> trio.SocketStream:
    """Connect to ``host:port``, with the source address bound to ``bind`` if given."""
    # The source address picks the family (an IPv6 binding connects over IPv6).
    inet6 = ":" in (bind if bind is not None else host)
    sock = trio.socket.socket(
        trio.socket.AF_INET6 if inet6 else trio.socket.AF_INET, trio.socket.SOCK_STREAM
    )
    try:
        if bind is not None:
            await sock.bind((bind, 0))
        with trio.fail_after(timeout):
            await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


#: No reply this long after the data: send a ``NOOP`` (see ``SmtpSession.send``'s ``nudge``),
#: then another after twice as long, up to ``NUDGES`` (each reply may be lost too).
NUDGE_AFTER = 0.025
NUDGES = 3


class SmtpSession:
    """One client session; ``timeout`` bounds every read and write."""

    def __init__(self, stream: trio.abc.Stream, *, timeout: float = 60.0, leftover: bytes = b""):
        self.stream = stream
        self.timeout = timeout
        self.proto = _Protocol()
        self._leftover = leftover
        #: Pipelined ``NOOP``s sent after the data whose replies are still to be read.
        self._noop_unread = 0
        #: ``NOOP``s sent after data (tests, counters).
        self.nudges = 0

    async def _flush(self) -> None:
        out = self.proto.get_outgoing_data()
        if out:
            with trio.fail_after(self.timeout):
                await self.stream.send_all(out)

    async def _response(self, nudge: bool = False) -> SMTPResponse:
        while True:
            await self._flush()
            buffered = self.proto.feed_bytes(b"")  # a reply that arrived with an earlier one
            if buffered is not None:
                return buffered
            if self._leftover:
                data, self._leftover = self._leftover, b""
            else:
                data = await self._receive(nudge)
                nudge = False
                if not data:
                    raise SmtpError("connection closed by server")
            resp = self.proto.feed_bytes(data)
            if resp is not None:
                return resp

    async def _receive(self, nudge: bool) -> bytes:
        wait = NUDGE_AFTER
        for _ in range(NUDGES if nudge else 0):
            with trio.move_on_after(wait):
                return bytes(await self.stream.receive_some(65536))
            # Pipelined after the data (RFC 2920: NOOP may end a command group).
            with trio.fail_after(self.timeout):
                await self.stream.send_all(b"NOOP\r\n")
            self._noop_unread += 1
            self.nudges += 1
            wait *= 2
        with trio.fail_after(self.timeout):
            return bytes(await self.stream.receive_some(65536))

    async def _cmd(self, method: Any, *args: Any, nudge: bool = False) -> SMTPResponse:
        try:
            while self._noop_unread:
                # Read the nudges' replies first: issued through the state machine so it
                # expects them, but their bytes already went out.
                self._noop_unread -= 1
                self.proto.noop()
                self.proto.get_outgoing_data()
                r = await self._response()
                if r.is_error():
                    raise SmtpError(f"NOOP {r.code} {r.message}")
            method(*args)
            return await self._response(nudge)
        except SMTPException as exc:
            raise SmtpError(str(exc)) from exc
        except (trio.BrokenResourceError, trio.TooSlowError, OSError) as exc:
            raise SmtpError(f"{type(exc).__name__}: {exc}") from exc

    async def start(self, domain: str) -> SMTPResponse:
        """Read the greeting and say EHLO; a non-2xx greeting or EHLO raises ``SmtpError``."""
        greet = await self._cmd(lambda: None)
        if greet.is_error():
            raise SmtpError(f"greeting {greet.code} {greet.message}")
        ehlo = await self._cmd(self.proto.send_greeting, domain)
        if ehlo.is_error():
            raise SmtpError(f"EHLO {ehlo.code} {ehlo.message}")
        return ehlo

    async def send(
        self,
        mail_from: str,
        rcpt_to: Sequence[str],
        data: bytes,
        params: Sequence[str] = (),
        *,
        all_or_nothing: bool = False,
        stalled_since: Callable[[float], bool] | None = None,
        nudge: bool = False,
    ) -> SendResult:
        """One transaction. Refusals come back in the result; a broken session raises.

        ``all_or_nothing``: if any recipient is refused, reset instead of sending
        the data (mmove must never leave a partial copy behind).
        ``stalled_since(t)``: if this process stood still since ``DATA`` was sent,
        give up before the data (its source IP may have moved meanwhile, and the
        reply with it; see :class:`duravip.mail.outbound.StallWatch`).
        ``nudge``: if the reply to the data is not in after ``NUDGE_AFTER``, send a
        ``NOOP`` (PIPELINING servers only). Why: the server holds the message
        from its ``250`` on, and a crash here before it is read and recorded
        makes a copy in doubt. A lost ``250`` alone is resent by the server's TCP
        only after its retransmission timeout (200 ms or more, doubling), but
        the ``NOOP``'s reply, a later segment, makes our TCP report the hole
        (SACK) and the server's TCP repeats the ``250`` at once: the window
        shrinks from hundreds of milliseconds to about one round trip.
        """
        r = await self._cmd(self.proto.mail_with, mail_from, params)
        if r.is_error():
            return SendResult(r.code, r.message, (), (), ())
        accepted: list[str] = []
        deferred: list[tuple[str, str]] = []
        rejected: list[tuple[str, str]] = []
        for rcpt in rcpt_to:
            r = await self._cmd(self.proto.recipient, rcpt)
            text = f"{r.code} {r.message}"
            if not r.is_error():
                accepted.append(rcpt)
            elif r.code < 500:
                deferred.append((rcpt, text))
            else:
                rejected.append((rcpt, text))
        if not accepted or (all_or_nothing and (deferred or rejected)):
            await self._cmd(self.proto.reset)
            worst = rejected[0] if rejected and not deferred else (deferred or rejected)[0]
            code = int(worst[1][:3])
            return SendResult(code, worst[1][4:], (), tuple(deferred), tuple(rejected))
        t_data = time.monotonic()
        r = await self._cmd(self.proto.start_data)
        if r.is_error():
            await self._cmd(self.proto.reset)
            return SendResult(r.code, r.message, (), tuple(deferred), tuple(rejected))
        # From the first byte of content to the reply, a cancellation would leave
        # us not knowing whether the server took the message (and resending it
        # elsewhere makes a duplicate): let it finish, bounded by the timeout.
        with trio.CancelScope(shield=True):
            if stalled_since is not None and stalled_since(t_data):
                raise SmtpError("this process stood still before the data: not sending it")
            try:
                r = await self._cmd(
                    self.proto.data_raw,
                    data,
                    nudge=nudge and "PIPELINING" in self.proto.extensions,
                )
            except SmtpError as exc:
                exc.after_data = True
                raise
        return SendResult(r.code, r.message, tuple(accepted), tuple(deferred), tuple(rejected))

    async def quit(self) -> None:
        """Polite close; errors are ignored because every message is already accounted for."""
        try:
            if self.proto.state is not ClientState.finished:
                await self._cmd(self.proto.quit)
        except SmtpError:
            pass
        finally:
            await self.stream.aclose()

    async def abort(self) -> None:
        await trio.aclose_forcefully(self.stream)


def is_connect_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (
        errno.ECONNREFUSED,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.ETIMEDOUT,
        errno.EADDRNOTAVAIL,
    )
