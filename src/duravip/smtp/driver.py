"""Thin Trio driver: one task per SMTP connection around :class:`SmtpServer`.

It moves bytes between the stream and the sans-IO core, awaits the sink for
each message (``250`` only after the sink returned, i.e. the message is
durable), applies the command/data/session timeouts, runs the STARTTLS
handshake the core asks for (swapping its stream for a ``trio.SSLStream``),
and on shutdown lets the transaction in progress finish before it says ``421``.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import ssl

import trio

from duravip.smtp.server import (
    ConnectionClosed,
    MessageReceived,
    ServerSettings,
    SmtpServer,
    StartTLS,
)
from duravip.smtp.types import MessageSink, PermanentFailure, TemporaryFailure

__all__ = ["GOODBYE_TIMEOUT", "RECEIVE_SIZE", "handle_connection"]

log = logging.getLogger("duravip.smtp")

#: Bytes asked of the stream per receive (large enough for a 1 KB message and
#: its pipelined commands in one call).
RECEIVE_SIZE = 65536
#: How long a cancelled session may spend sending its ``421`` before closing.
GOODBYE_TIMEOUT = 1.0


class _Interrupted(Exception):
    """A wait for the client was cut short just as it woke (no byte was read)."""


class _Resume(Exception):
    """Bytes arrived as the wait was being cut short: leave the cancelled scope with them."""

    def __init__(self, data: bytes | bytearray) -> None:
        super().__init__()
        self.data = data


def _count(counters: dict[str, int] | None, key: str) -> None:
    if counters is not None:
        counters[key] = counters.get(key, 0) + 1


async def handle_connection(
    stream: trio.abc.Stream,
    *,
    settings: ServerSettings,
    sink: MessageSink,
    peer: tuple[str, int],
    local: tuple[str, int],
    shutdown: trio.Event | None = None,
    greeting: bool = True,
    initial_data: bytes = b"",
    counters: dict[str, int] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Serve one SMTP session on ``stream`` until it ends; always closes ``stream``.

    * The ``220 <hostname> ESMTP duravip`` banner is always the first thing
      the driver writes. ``greeting=False`` is for a caller that already ran
      its own preamble on the stream (the mmove challenge-response): the
      driver writes exactly the same banner, so a stock SMTP client can
      start right after the preamble; the flag only changes the session's
      log line. Bytes the caller read past its preamble go in ``initial_data``
      and are processed as if received first.
    * ``shutdown`` set: an idle session gets ``421 4.3.2`` at once; a
      transaction in progress (after MAIL, during DATA, while the sink
      works) is finished first, then ``421``. The caller bounds that drain by
      cancelling this task; on cancellation the driver still tries to send
      ``421`` for up to :data:`GOODBYE_TIMEOUT` seconds.
    * Timeouts: ``limits.command_timeout`` between commands (and for the TLS
      handshake), ``limits.data_timeout`` while a body is arriving; then
      ``421 4.4.2``. ``limits.session_timeout`` bounds the whole session
      (``421 4.4.2 ... session time limit exceeded``; a sink call in progress
      is not interrupted).
    * STARTTLS: ``ssl_context`` is required when ``settings.tls`` is not
      ``off``. The handshake runs on this task; a failure or timeout ends this
      session only (``tls_handshake_failures``), a success is counted in
      ``tls_sessions``.
    * ``counters`` (optional) gets ``messages``, ``rejects``, ``timeouts``,
      ``session_timeouts``, ``sink_errors``, ``tls_sessions`` and
      ``tls_handshake_failures`` incremented, and at the end of the session
      ``bare_newline_rejects`` / ``bare_newline_normalized`` /
      ``starttls_pipelining_rejects``.
    """
    if settings.tls != "off" and ssl_context is None:
        raise ValueError(f"tls = {settings.tls} needs an ssl_context")
    session = _Session(stream, settings, sink, peer, local, shutdown, counters, ssl_context)
    log.debug(
        "%s session from %s:%d to %s:%d",
        "smtp" if greeting else "smtp-after-preamble",
        *peer,
        *local,
    )
    if initial_data:
        session.server.receive_data(initial_data)
    ended = False
    try:
        async with trio.open_nursery() as nursery:
            if shutdown is not None:
                nursery.start_soon(session.watch_shutdown, shutdown)
            await session.run()
            ended = True
            nursery.cancel_scope.cancel()
    finally:
        if counters is not None:
            for key, n in (
                ("bare_newline_rejects", session.server.bare_newline_rejects),
                ("bare_newline_normalized", session.server.bare_newline_normalized),
                ("starttls_pipelining_rejects", session.server.starttls_pipelining_rejects),
            ):
                if n:
                    counters[key] = counters.get(key, 0) + n
        if not ended:
            await _goodbye(session.stream, session.server)
        with trio.CancelScope(shield=True):
            # After STARTTLS the SSLStream, which closes the socket under it too.
            await trio.aclose_forcefully(session.stream)


class _Session:
    """State one connection's tasks share (the main loop and the shutdown watcher)."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        settings: ServerSettings,
        sink: MessageSink,
        peer: tuple[str, int],
        local: tuple[str, int],
        shutdown: trio.Event | None,
        counters: dict[str, int] | None,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        #: The socket stream, or the SSLStream over it once STARTTLS succeeded.
        self.stream: trio.abc.Stream = stream
        self.ssl_context = ssl_context
        self.deadline = trio.current_time() + settings.limits.session_timeout
        self.server = SmtpServer(settings)
        self.limits = settings.limits
        self.sink = sink
        self.peer = peer
        self.local = local
        self.shutdown = shutdown
        self.counters = counters
        #: The TLS handshake's scope while it runs (a shutdown cancels it).
        self.recv_scope: trio.CancelScope | None = None
        #: The session loop's scope, and whether it is waiting for the client.
        self.loop_scope: trio.CancelScope | None = None
        self.receiving = False
        self._use_socket(stream)

    def _use_socket(self, stream: trio.abc.Stream) -> None:
        """Plain TCP: read and write the socket's fd directly; anything else: the stream API."""
        self.sock: trio.socket.SocketType | None = None
        self.fd = -1
        if isinstance(stream, trio.SocketStream):
            self.sock = stream.socket
            self.fd = stream.socket.fileno()

    def _stopping(self) -> bool:
        return (
            self.shutdown is not None and self.shutdown.is_set() and not self.server.in_transaction
        )

    async def watch_shutdown(self, event: trio.Event) -> None:
        await event.wait()
        # Only an idle session is interrupted; a transaction in progress finishes.
        if self.server.in_transaction:
            return
        if self.recv_scope is not None:  # the TLS handshake
            self.recv_scope.cancel()
        elif self.receiving and self.loop_scope is not None:
            self.loop_scope.cancel()

    async def run(self) -> None:
        """The session loop; returns when the session is over or the peer went away."""
        server = self.server
        try:
            while True:
                # One cancel scope per stretch of session, not per receive: its
                # deadline is armed only while waiting for the client (see _receive).
                resume = False
                with trio.CancelScope(deadline=math.inf) as scope:
                    self.loop_scope = scope
                    try:
                        if await self._loop(scope):
                            return
                    except _Interrupted:
                        pass
                    except _Resume as r:  # as the old per-receive scope: bytes read win
                        server.receive_data(r.data)
                        resume = True
                self.loop_scope = None
                if resume:
                    continue
                if self._stopping():
                    continue
                whole = trio.current_time() >= self.deadline
                _count(self.counters, "session_timeouts" if whole else "timeouts")
                server.timeout(session=whole)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("session from %s:%d ended: %r", *self.peer, exc)
            server.shutdown()  # nothing more to say; mark closed
            server.data_to_send()

    async def _loop(self, scope: trio.CancelScope) -> bool:
        """Run events until the session ends (True) or a wait for the client is cut short.

        A cut-short wait (timeout, or shutdown of an idle session) leaves the
        scope as cancelled or raises :class:`_Interrupted`; the caller decides.
        """
        server = self.server
        while True:
            event = server.next_event()
            out = server.data_to_send()
            if out:
                await self._send(out, scope)
            if isinstance(event, ConnectionClosed):
                return True
            if isinstance(event, StartTLS):
                scope.deadline = math.inf
                if not await self._start_tls():
                    return True
                continue
            if isinstance(event, MessageReceived):
                scope.deadline = math.inf  # the sink is never cut by a client timeout
                await _deliver(server, event, self.sink, self.peer, self.local, self.counters)
                if self.shutdown is not None and self.shutdown.is_set():
                    server.shutdown()  # after its 250: no new transaction
                continue
            if self._stopping():
                server.shutdown()
                continue
            timeout = self.limits.data_timeout if server.in_data else self.limits.command_timeout
            server.receive_data(
                await self._receive(scope, min(trio.current_time() + timeout, self.deadline))
            )

    async def _send(self, data: bytes, scope: trio.CancelScope) -> None:
        """``send_all``; on a plain socket straight to ``write(2)`` (no trio layers).

        The receive deadline may still be set (it is cleared lazily, see
        :meth:`_receive`): it is cleared before any wait here, so a send is
        never cut by a client timeout.
        """
        sock = self.sock
        if sock is None:
            scope.deadline = math.inf
            await self.stream.send_all(data)
            return
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                scope.deadline = math.inf
                await trio.lowlevel.wait_writable(sock)
            except OSError as exc:
                raise trio.BrokenResourceError(repr(exc)) from exc

    async def _receive(self, scope: trio.CancelScope, deadline: float) -> bytes | bytearray:
        """The next bytes from the client (``b""``: it closed), waiting until ``deadline``.

        On a plain socket this is one ``wait_readable`` and one ``read(2)``:
        per command one trip through the scheduler instead of the three of
        ``send_all`` + ``receive_some`` + a cancel scope each. Waiting first
        also makes it a checkpoint when bytes are already there, so a client
        that floods pipelined commands cannot starve the other sessions.

        The deadline is left set on return: nothing after a receive
        checkpoints before the next one except ``_send``'s waits, the sink and
        the TLS handshake, which clear it first (one deadline update per
        command instead of two).
        """
        self.receiving = True
        scope.deadline = deadline
        try:
            sock = self.sock
            if sock is None:
                data = await self.stream.receive_some(RECEIVE_SIZE)
                if scope.cancel_called:
                    raise _Resume(data)  # the next checkpoint in this scope would raise
                return data
            while True:
                # A lock-step client has not answered yet: a read now would only
                # say EAGAIN, so wait first.
                await trio.lowlevel.wait_readable(sock)
                try:
                    data = os.read(self.fd, RECEIVE_SIZE)
                except BlockingIOError:
                    if scope.cancel_called:
                        raise _Interrupted from None  # cut short as it woke: nothing read
                    continue
                except OSError as exc:
                    raise trio.BrokenResourceError(repr(exc)) from exc
                if scope.cancel_called:
                    raise _Resume(data)  # the next checkpoint in this scope would raise
                return data
        finally:
            self.receiving = False

    async def _start_tls(self) -> bool:
        """The server-side handshake after ``220 Ready to start TLS``; False: session over.

        Bounded by the command timeout (and the session's deadline); a shutdown
        of the listener interrupts it. Nothing more is written on failure: the
        client may be half-way into TLS, so plaintext would only confuse it.
        """
        assert self.ssl_context is not None  # checked in handle_connection
        tls = trio.SSLStream(self.stream, self.ssl_context, server_side=True)
        deadline = min(trio.current_time() + self.limits.command_timeout, self.deadline)
        failure: str | None = None
        with trio.CancelScope(deadline=deadline) as scope:
            self.recv_scope = scope
            try:
                await tls.do_handshake()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                failure = repr(exc.__cause__ or exc)
        self.recv_scope = None
        if scope.cancelled_caught:
            failure = "handshake timed out or the listener stopped"
        if failure is not None:
            _count(self.counters, "tls_handshake_failures")
            log.info("TLS handshake with %s:%d failed: %s", *self.peer, failure)
            self.server.shutdown()  # closed; the 421 is not sent (see above)
            self.server.data_to_send()
            return False
        _count(self.counters, "tls_sessions")
        _ack_now(self.stream)
        self.stream = tls
        self._use_socket(tls)
        self.server.tls_started()
        return True


def _ack_now(stream: trio.abc.Stream) -> None:
    """ACK the client's TLS Finished at once instead of after the delayed-ACK timer.

    With TLS 1.3 the server has nothing to send after the client's Finished, so
    a client without TCP_NODELAY (smtplib, most MTAs) holds its EHLO back under
    Nagle until our delayed ACK: 40-45 ms per session on Linux loopback, about
    2 ms with this (setting TCP_QUICKACK sends a pending ACK now).
    """
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if quickack is None or not isinstance(stream, trio.SocketStream):
        return
    try:
        stream.setsockopt(socket.IPPROTO_TCP, quickack, 1)
    except OSError as exc:
        log.debug("TCP_QUICKACK not set: %r", exc)


async def _deliver(
    server: SmtpServer,
    event: MessageReceived,
    sink: MessageSink,
    peer: tuple[str, int],
    local: tuple[str, int],
    counters: dict[str, int] | None,
) -> None:
    """Hand one message to the sink and turn its outcome into the reply."""
    try:
        queue_id = await sink.accept(event.envelope(peer, local))
    except TemporaryFailure as exc:
        _count(counters, "rejects")
        server.reject_message(451, "4.3.0", str(exc) or "Error: try again later")
    except PermanentFailure as exc:
        _count(counters, "rejects")
        server.reject_message(554, "5.6.0", str(exc) or "Error: message refused")
    except Exception:
        # A sink bug must cost this message a retry, never the listener.
        log.exception("sink failed for message from %s:%d", *peer)
        _count(counters, "sink_errors")
        server.reject_message(451, "4.3.0", "Error: local error in processing")
    else:
        _count(counters, "messages")
        server.accept_message(queue_id)


async def _goodbye(stream: trio.abc.Stream, server: SmtpServer) -> None:
    """Best effort ``421`` when the session is being torn down (cancel or error)."""
    server.shutdown()
    out = server.data_to_send()
    if not out:
        return
    with trio.CancelScope(shield=True), trio.move_on_after(GOODBYE_TIMEOUT):
        try:
            await stream.send_all(out)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("no 421 for a closing session: %r", exc)
