"""mmove (service ``ECmmove2``): moving queued messages between nodes over SMTP.

Receiver: the ``ECCluster_Listener``. Each connection must pass the keyring
challenge-response of :mod:`duravip.mail.mmove_auth` before the SMTP driver
sees a byte. MAIL FROM carries ``XBINDING``, ``XREQUEST``, ``XMMOVEID``,
``XQID`` (the sender's queue id) and ``XORIGIN`` as xtext. The dedup key is
``XMMOVEID/XQID``: a retry of one transfer (same sender copy) is recognised,
while a message that legitimately comes back later (from another copy) is not
mistaken for a duplicate. The key is durable with the message and outlives it
(the spool's ``SEEN`` checkpoints), so a retry after the message was already
delivered is still answered ``250`` without storing it again.

After the preamble both directions are sealed (:mod:`duravip.mail.mmove_crypto`):
the SMTP driver and client run unchanged on a :class:`SealedStream`, and a
rejected frame ends the connection (``mmove_frame_rejected``).

Sender: one authenticated connection per batch; a message is removed from the
local spool only after the receiver's ``250`` arrived in an intact frame.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping, Sequence

import attrs
import trio

from duravip.config.model import HostPort, SmtpLimits
from duravip.mail import mmove_auth as auth
from duravip.mail.mmove_crypto import FrameRejected, SealedStream, derive_keys
from duravip.mail.router import DEFAULT
from duravip.mail.smtpclient import SmtpError, SmtpSession, open_tcp
from duravip.mail.spool import NewMessage, Spool, SpoolError
from duravip.mail.spool_format import QueuedMessage, RecordTooLarge
from duravip.smtp.driver import handle_connection
from duravip.smtp.server import ServerSettings
from duravip.smtp.types import Envelope, PermanentFailure, TemporaryFailure

log = logging.getLogger("duravip.mail.ECmmove2")

SERVICE = "ECmmove2"
EHLO_KEYWORD = "XMMOVE"
MAIL_PARAMS = frozenset({"XBINDING", "XREQUEST", "XMMOVEID", "XQID", "XORIGIN"})
PREAMBLE_TIMEOUT = 5.0
#: Sent instead of the challenge to a connection over the caps (the sender retries later).
BUSY = b"-ERR busy\r\n"


def _bump(counters: MutableMapping[str, int], key: str, n: int = 1) -> None:
    counters[key] = counters.get(key, 0) + n


async def _read_line(stream: trio.abc.Stream, buf: bytes) -> tuple[bytes, bytes]:
    while True:
        got = auth.split_line(buf)
        if got is not None:
            return got
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise auth.AuthError("connection closed during preamble")
        buf += chunk


async def server_preamble(
    stream: trio.abc.Stream,
    keys: Sequence[bytes],
    cluster: str,
    *,
    on_reject: Callable[[FrameRejected], None] | None = None,
) -> tuple[SealedStream, int]:
    """Run the server side of the challenge-response.

    Returns the sealed stream the session continues on (keyed from the keyring
    key the peer proved and both nonces) and that key's index in ``keys``.
    """
    nonce_s = auth.new_nonce()
    await stream.send_all(auth.server_challenge(nonce_s))
    try:
        line, rest = await _read_line(stream, b"")
        verified = auth.server_accept(line, nonce_s, keys, cluster)
    except auth.AuthError:
        await stream.send_all(auth.REFUSAL)
        raise
    await stream.send_all(verified.proof)
    session = derive_keys(verified.key, nonce_s, verified.nonce_c, cluster)
    sealed = SealedStream(
        stream,
        session.server_to_client,
        session.client_to_server,
        initial=rest,
        on_reject=on_reject,
    )
    return sealed, verified.key_index


async def client_preamble(
    stream: trio.abc.Stream,
    key: bytes,
    cluster: str,
    *,
    on_reject: Callable[[FrameRejected], None] | None = None,
) -> SealedStream:
    """Run the client side; returns the sealed stream (the SMTP banner comes next, sealed)."""
    line, rest = await _read_line(stream, b"")
    if line == BUSY.rstrip():
        raise MoveFailed("receiver busy (connection cap), retry later")
    reply, nonce_s, nonce_c = auth.client_response(line, key, cluster)
    await stream.send_all(reply)
    proof, rest = await _read_line(stream, rest)
    if proof.startswith(b"-ERR"):
        raise auth.AuthError("refused by the receiver (keyring mismatch?)")
    auth.client_verify(proof, key, nonce_s, nonce_c, cluster)
    session = derive_keys(key, nonce_s, nonce_c, cluster)
    return SealedStream(
        stream,
        session.client_to_server,
        session.server_to_client,
        initial=rest,
        on_reject=on_reject,
    )


def _frame_rejected(
    counters: MutableMapping[str, int], peer: str
) -> Callable[[FrameRejected], None]:
    def note(exc: FrameRejected) -> None:
        # Tampering on the path (or a broken peer): the connection ends, and with
        # it any transaction in flight; the sender keeps what had no intact 250.
        _bump(counters, "mmove_frame_rejected")
        log.warning("%s: connection with %s ended: %s", SERVICE, peer, exc)

    return note


class Receiver:
    """Stores moved messages durably, once per transfer key."""

    def __init__(
        self,
        spool: Spool,
        counters: MutableMapping[str, int],
        *,
        on_stored: Callable[[str], None] = lambda qid: None,
    ) -> None:
        self.spool = spool
        self.counters = counters
        self.on_stored = on_stored
        self._inflight: dict[str, trio.Event] = {}
        #: Test hook: called with the key after the durable store; True drops the connection
        #: before the ``250`` (simulates a lost reply).
        self.fault_after_store: Callable[[str], bool] | None = None

    async def accept(self, env: Envelope, drop: trio.CancelScope | None = None) -> str:
        p = env.mail_params
        if "XMMOVEID" not in p or "XQID" not in p:
            raise PermanentFailure("mmove needs XMMOVEID and XQID")
        try:
            mmove_id = auth.xtext_decode(p["XMMOVEID"])
            sender_qid = auth.xtext_decode(p["XQID"])
            binding = auth.xtext_decode(p.get("XBINDING", DEFAULT))
            requested = auth.xtext_decode(p.get("XREQUEST", binding))
            origin = auth.xtext_decode(p.get("XORIGIN", ""))
        except ValueError as exc:
            raise PermanentFailure(f"bad mmove parameter: {exc}") from exc
        key = f"{mmove_id}/{sender_qid}"
        while key in self._inflight:
            await self._inflight[key].wait()
        if self.spool.has_mmove_id(key):
            _bump(self.counters, "mmove_dup")
            log.info("%s: duplicate transfer %s from %s acknowledged", SERVICE, key, env.peer[0])
            return f"duplicate-{mmove_id}"
        done = trio.Event()
        self._inflight[key] = done
        try:
            qid = await self.spool.store(
                NewMessage(
                    mail_from=env.mail_from,
                    rcpt_to=env.rcpt_to,
                    data=env.data,
                    binding=binding,
                    requested=requested,
                    origin=origin,
                    mmove_id=mmove_id,
                    transfer_key=key,
                )
            )
        except RecordTooLarge as exc:
            raise PermanentFailure(str(exc)) from exc
        except SpoolError as exc:
            raise TemporaryFailure(f"spool: {exc}") from exc
        finally:
            del self._inflight[key]
            done.set()
        _bump(self.counters, "mmove_received")
        log.info(
            "%s: received %s as %s (binding %s) from %s",
            SERVICE,
            mmove_id,
            qid,
            binding,
            env.peer[0],
        )
        self.on_stored(qid)
        if self.fault_after_store is not None and self.fault_after_store(key) and drop is not None:
            drop.cancel()
            await trio.sleep_forever()
        return qid


class _ConnSink:
    def __init__(self, receiver: Receiver, scope: trio.CancelScope) -> None:
        self.receiver = receiver
        self.scope = scope

    async def accept(self, envelope: Envelope) -> str:
        return await self.receiver.accept(envelope, self.scope)


async def serve_listener(
    receiver: Receiver,
    address: HostPort,
    *,
    node_name: str,
    cluster: str,
    keys: Callable[[], Sequence[bytes]],
    limits: SmtpLimits,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The ``ECCluster_Listener``: authenticate, then SMTP into ``receiver``."""
    settings = ServerSettings(
        hostname=node_name,
        # The peer is authenticated and the message already acknowledged by the
        # cluster: a bare newline (an older sender's stored body) is rewritten to
        # CRLF, never refused, which would strand the message at the sender.
        limits=attrs.evolve(limits, bare_newline="normalize"),
        extra_mail_params=MAIL_PARAMS,
        extra_ehlo=(EHLO_KEYWORD,),
    )
    listeners = await trio.open_tcp_listeners(address.port, host=str(address.host))

    # Connections are capped before the preamble (in total and per peer IP): an
    # unauthenticated flood holds at most this many fds, each for PREAMBLE_TIMEOUT.
    per_ip: dict[str, int] = {}

    async def handle(stream: trio.SocketStream) -> None:
        try:
            ip = str(stream.socket.getpeername()[0])
        except OSError:
            return  # gone already; serve_listeners closes the stream
        if sum(per_ip.values()) >= limits.max_sessions or (
            per_ip.get(ip, 0) >= limits.max_sessions_per_ip
        ):
            _bump(receiver.counters, "mmove_refused_busy")
            with trio.move_on_after(1.0):
                try:
                    await stream.send_all(BUSY)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    log.debug("%s: busy refusal to %s not sent: %r", SERVICE, ip, exc)
            await trio.aclose_forcefully(stream)
            return
        per_ip[ip] = per_ip.get(ip, 0) + 1
        # trio.serve_listeners lets a handler's exception end the listener, and the
        # daemon with it: nothing a peer sends may get that far.
        try:
            await authenticated(stream)
        except Exception:
            _bump(receiver.counters, "mmove_session_errors")
            log.exception("%s: connection handler failed", SERVICE)
            await trio.aclose_forcefully(stream)
        finally:
            if per_ip[ip] > 1:
                per_ip[ip] -= 1
            else:
                del per_ip[ip]

    async def authenticated(stream: trio.SocketStream) -> None:
        try:
            peer = stream.socket.getpeername()
            local = stream.socket.getsockname()
        except OSError:
            await trio.aclose_forcefully(stream)
            return
        try:
            with trio.fail_after(PREAMBLE_TIMEOUT):
                sealed, key_index = await server_preamble(
                    stream,
                    keys(),
                    cluster,
                    on_reject=_frame_rejected(receiver.counters, str(peer[0])),
                )
        except (
            auth.AuthError,
            trio.TooSlowError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            OSError,
        ) as exc:
            _bump(receiver.counters, "mmove_auth_failed")
            log.warning("%s: refused connection from %s: %s", SERVICE, peer[0], exc)
            await trio.aclose_forcefully(stream)
            return
        # Which key the peer proved: during a rotation, "secondary" going to zero
        # says every peer has moved to the new primary key.
        _bump(receiver.counters, "mmove_auth_primary" if key_index == 0 else "mmove_auth_secondary")
        with trio.CancelScope() as scope:
            await handle_connection(
                sealed,
                settings=settings,
                sink=_ConnSink(receiver, scope),
                peer=(peer[0], peer[1]),
                local=(local[0], local[1]),
                shutdown=shutdown,
                greeting=False,
            )
        if scope.cancelled_caught:
            await trio.aclose_forcefully(sealed)

    await trio.serve_listeners(handle, listeners, task_status=task_status)


class MoveFailed(Exception):
    """The batch could not be (fully) moved; the rest stays queued here."""


async def move_batch(
    spool: Spool,
    messages: Sequence[QueuedMessage],
    *,
    address: HostPort,
    key: bytes,
    cluster: str,
    helo: str,
    counters: MutableMapping[str, int],
    node: str,
    timeout: float = 30.0,
) -> int:
    """Move ``messages`` to ``address`` over one connection; returns how many moved.

    Each message is removed here only after the receiver's ``250``. Raises
    :class:`MoveFailed` when the batch stopped early.
    """
    try:
        stream = await open_tcp(str(address.host), address.port, timeout=timeout)
    except (OSError, trio.TooSlowError) as exc:
        raise MoveFailed(f"connect to {node} at {address}: {exc!r}") from exc
    moved: list[str] = []

    async def forget(cur: QueuedMessage) -> None:
        # The receiver has it durably; if this remove is lost, a later re-move is a
        # dup: no cancellation may cut it short.
        try:
            with trio.CancelScope(shield=True):
                await spool.remove(cur.id)
        except SpoolError as exc:
            log.error("%s: moved %s but could not remove it here: %s", SERVICE, cur.id, exc)
        moved.append(cur.id)
        _bump(counters, "mmove_sent")
        log.info("%s: moved %s (binding %s) to %s", SERVICE, cur.id, cur.binding, node)

    session: SmtpSession | None = None
    failure: BaseException | None = None
    # Local removes run beside the next transfer, so their flushes overlap the network.
    async with trio.open_nursery() as removes:
        try:
            try:
                with trio.fail_after(PREAMBLE_TIMEOUT):
                    sealed = await client_preamble(
                        stream, key, cluster, on_reject=_frame_rejected(counters, node)
                    )
            except trio.TooSlowError as exc:
                raise auth.AuthError(f"no preamble within {PREAMBLE_TIMEOUT}s") from exc
            session = SmtpSession(sealed, timeout=timeout)
            await session.start(helo)
            if EHLO_KEYWORD not in session.proto.extensions:
                raise MoveFailed(f"{node} does not offer {EHLO_KEYWORD}")
            for msg in messages:
                cur = spool.get(msg.id)
                if cur is None:
                    continue
                params = [
                    f"XBINDING={auth.xtext_encode(cur.binding)}",
                    f"XREQUEST={auth.xtext_encode(cur.requested)}",
                    f"XMMOVEID={auth.xtext_encode(cur.mmove_id)}",
                    f"XQID={auth.xtext_encode(cur.id)}",
                    f"XORIGIN={auth.xtext_encode(cur.origin)}",
                ]
                res = await session.send(
                    cur.mail_from,
                    cur.rcpt_to,
                    spool.read_data(cur.id),
                    params,
                    all_or_nothing=True,
                )
                if not 200 <= res.code < 300:
                    raise MoveFailed(f"{node} refused {cur.id}: {res.code} {res.message}")
                removes.start_soon(forget, cur)
        except auth.AuthError as exc:
            _bump(counters, "mmove_auth_failed")
            failure = exc
        except (
            MoveFailed,
            SmtpError,
            trio.TooSlowError,
            trio.BrokenResourceError,
            OSError,
        ) as exc:
            failure = exc
    if failure is not None:
        if session is not None:
            await session.abort()
        else:
            await trio.aclose_forcefully(stream)
        if isinstance(failure, MoveFailed):
            raise failure
        raise MoveFailed(f"move to {node} at {address}: {failure}") from failure
    assert session is not None
    await session.quit()
    return len(moved)
