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
from collections.abc import AsyncIterator, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager

import attrs
import trio

from duravip.config.model import HostPort, SmtpLimits
from duravip.mail import mmove_auth as auth
from duravip.mail import transfer_state as ts
from duravip.mail.mmove_preamble import (
    BUSY,
    PREAMBLE_TIMEOUT,
    SERVICE,
    MoveFailed,
    _frame_rejected,
    client_preamble,
    server_preamble,
)
from duravip.mail.router import DEFAULT
from duravip.mail.smtpclient import SmtpError, SmtpSession, open_tcp
from duravip.mail.spool import NewMessage, Spool, SpoolError, new_queue_id
from duravip.mail.spool_format import QueuedMessage, RecordTooLarge
from duravip.mail.transfer_state import Answer, TransferState
from duravip.smtp.driver import handle_connection
from duravip.smtp.server import ServerSettings
from duravip.smtp.types import Envelope, PermanentFailure, TemporaryFailure

log = logging.getLogger("duravip.mail.ECmmove2")
__all__ = [
    "BUSY",
    "EHLO_KEYWORD",
    "MAIL_PARAMS",
    "PREAMBLE_TIMEOUT",
    "SERVICE",
    "MoveFailed",
    "Receiver",
    "client_preamble",
    "move_batch",
    "serve_listener",
    "server_preamble",
]

EHLO_KEYWORD = "XMMOVE"
MAIL_PARAMS = frozenset(
    {"XBINDING", "XREQUEST", "XMMOVEID", "XQID", "XORIGIN"}
    | {ts.TID_PARAM, ts.SENDER_PARAM, ts.COMMIT_PARAM, ts.QUERY_PARAM, ts.DOUBT_PARAM}
)


def _bump(counters: MutableMapping[str, int], key: str, n: int = 1) -> None:
    counters[key] = counters.get(key, 0) + n


class Receiver:
    """Stores moved messages durably (pending until the sender commits), once per key;
    answers the control transactions (commit, and queries about this node's own sends)."""

    def __init__(
        self,
        spool: Spool,
        counters: MutableMapping[str, int],
        *,
        on_stored: Callable[[str], None] = lambda qid: None,
        transfers: TransferState | None = None,
    ) -> None:
        self.spool = spool
        self.counters = counters
        self.on_stored = on_stored
        #: This node's own sends (shared with its ``move_batch`` calls), for queries.
        self.transfers = transfers if transfers is not None else TransferState()
        self._inflight: dict[str, trio.Event] = {}
        #: Test hook: called with the key after the durable store; True drops the connection
        #: before the ``250`` (simulates a lost reply).
        self.fault_after_store: Callable[[str], bool] | None = None

    @asynccontextmanager
    async def locked(self, key: str) -> AsyncIterator[None]:
        """Serialise everything done to one transfer key (store, commit, resolution)."""
        while key in self._inflight:
            await self._inflight[key].wait()
        done = trio.Event()
        self._inflight[key] = done
        try:
            yield
        finally:
            del self._inflight[key]
            done.set()

    async def settle(self, tid: str, qid: str, answer: Answer) -> bool:
        """Apply the sender's word on the pending copy ``qid`` of transfer ``tid``."""
        if answer not in (Answer.COMMITTED, Answer.ABORTED):
            return False
        async with self.locked(tid):
            cur = self.spool.get(qid)
            if cur is None or cur.pending is None:
                return False
            if answer is Answer.COMMITTED:
                await self.spool.update(qid, pending=None)
                _bump(self.counters, "mmove_committed")
                self.on_stored(qid)
            else:
                await self.spool.remove(qid)
                _bump(self.counters, "mmove_aborted")
                log.info("%s: pending copy %s (transfer %s) aborted by its sender", SERVICE, qid, tid)
        return True

    async def _commit(self, tids: list[str]) -> str:
        self.transfers.fault(ts.RECV_BEFORE_LIVE, tids[0] if tids else "")
        index = {m.transfer_key: m.id for m in self.spool.iter() if m.pending is not None}
        failed: list[SpoolError] = []

        async def one(tid: str, qid: str) -> None:
            try:
                await self.settle(tid, qid, Answer.COMMITTED)
            except SpoolError as exc:
                failed.append(exc)

        # Concurrent updates share the group-committed flushes.
        async with trio.open_nursery() as nursery:
            for tid in tids:
                if tid in index:
                    nursery.start_soon(one, tid, index[tid])
        if failed:
            # Still pending: the resolution asks the sender later.
            raise TemporaryFailure(f"spool: {failed[0]}")
        self.transfers.fault(ts.RECV_AFTER_LIVE, tids[0] if tids else "")
        return f"{ts.COMMIT_PARAM} {len(tids)}"

    def _answer(self, tids: list[str]) -> str:
        for tid in tids:
            self.transfers.fault(ts.ANSWER_BEFORE, tid)
        seen = self.spool.state.seen
        return ts.encode_answers({t: self.transfers.answer(t, seen) for t in tids})

    async def accept(self, env: Envelope, drop: trio.CancelScope | None = None) -> str:
        p = env.mail_params
        if ts.COMMIT_PARAM in p or ts.QUERY_PARAM in p:
            try:
                tids = ts.decode_ids(env.data)
            except ValueError as exc:
                raise PermanentFailure(str(exc)) from exc
            return await self._commit(tids) if ts.COMMIT_PARAM in p else self._answer(tids)
        if "XMMOVEID" not in p or "XQID" not in p:
            raise PermanentFailure("mmove needs XMMOVEID and XQID")
        try:
            mmove_id = auth.xtext_decode(p["XMMOVEID"])
            sender_qid = auth.xtext_decode(p["XQID"])
            binding = auth.xtext_decode(p.get("XBINDING", DEFAULT))
            requested = auth.xtext_decode(p.get("XREQUEST", binding))
            origin = auth.xtext_decode(p.get("XORIGIN", ""))
            tid = auth.xtext_decode(p[ts.TID_PARAM]) if ts.TID_PARAM in p else None
            sender = auth.xtext_decode(p.get(ts.SENDER_PARAM, "")) or None
            doubt = float(p.get(ts.DOUBT_PARAM, "0"))
        except ValueError as exc:
            raise PermanentFailure(f"bad mmove parameter: {exc}") from exc
        if tid is not None and (sender is None or not ts.valid_tid(tid)):
            raise PermanentFailure("two-phase mmove needs a valid XTID and XSENDER")
        # Two-phase (XTID): one key per attempt; single-phase (an older sender): per copy.
        key = tid if tid is not None else f"{mmove_id}/{sender_qid}"
        self.transfers.fault(ts.RECV_BEFORE_STORE, key)
        async with self.locked(key):
            if self.spool.has_mmove_id(key):
                _bump(self.counters, "mmove_dup")
                log.info("%s: duplicate transfer %s from %s acknowledged", SERVICE, key, env.peer[0])
                return f"duplicate-{mmove_id}"
            qid = await self._store(env, binding, requested, origin, mmove_id, key, sender if tid else None)
            if doubt > 0:  # rare: the sender's last delivery of it was cut off
                try:
                    await self.spool.update(qid, delivering=doubt)
                except SpoolError as exc:  # no 250: this attempt is aborted
                    raise TemporaryFailure(f"spool: {exc}") from exc
        _bump(self.counters, "mmove_received")
        log.info(
            "%s: received %s as %s (binding %s%s) from %s",
            SERVICE,
            mmove_id,
            qid,
            binding,
            ", pending" if tid else "",
            env.peer[0],
        )
        if tid is None:
            self.on_stored(qid)
        self.transfers.fault(ts.RECV_AFTER_STORE, key)
        if self.fault_after_store is not None and self.fault_after_store(key) and drop is not None:
            drop.cancel()
            await trio.sleep_forever()
        return qid

    async def _store(
        self,
        env: Envelope,
        binding: str,
        requested: str,
        origin: str,
        mmove_id: str,
        key: str,
        pending: str | None,
    ) -> str:
        try:
            return await self.spool.store(
                NewMessage(
                    mail_from=env.mail_from,
                    rcpt_to=env.rcpt_to,
                    data=env.data,
                    binding=binding,
                    requested=requested,
                    origin=origin,
                    mmove_id=mmove_id,
                    transfer_key=key,
                    pending=pending,
                )
            )
        except RecordTooLarge as exc:
            raise PermanentFailure(str(exc)) from exc
        except SpoolError as exc:
            raise TemporaryFailure(f"spool: {exc}") from exc


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
    transfers: TransferState | None = None,
) -> int:
    """Move ``messages`` to ``address`` over one connection; returns how many moved.

    Two-phase: each message goes with a fresh transfer id and is stored
    pending there; after its ``250`` it is removed here durably (the id in
    the same record: the commit point), and once every remove of the batch is
    durable one control transaction confirms them all. Raises
    :class:`MoveFailed` when the batch stopped early.
    """
    st = transfers if transfers is not None else TransferState()
    try:
        stream = await open_tcp(str(address.host), address.port, timeout=timeout)
    except (OSError, trio.TooSlowError) as exc:
        raise MoveFailed(f"connect to {node} at {address}: {exc!r}") from exc
    moved: list[str] = []
    attempts: list[str] = []

    async def forget(cur: QueuedMessage, tid: str) -> None:
        # The receiver holds it pending; this remove is the commit point, and no
        # cancellation may cut it short (the id stays in flight until it is durable).
        try:
            with trio.CancelScope(shield=True):
                st.fault(ts.SEND_AFTER_250, tid)
                await spool.remove(cur.id, tid=tid)
                st.fault(ts.SEND_AFTER_REMOVE, tid)
        except SpoolError as exc:
            log.error("%s: moved %s but could not remove it here: %s", SERVICE, cur.id, exc)
            return
        finally:
            st.inflight.discard(tid)
        moved.append(tid)
        _bump(counters, "mmove_sent")
        log.info("%s: moved %s (binding %s) to %s", SERVICE, cur.id, cur.binding, node)

    session: SmtpSession | None = None
    failure: BaseException | None = None
    try:
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
                    if cur is None or cur.pending is not None:
                        continue
                    tid = new_queue_id()
                    st.inflight.add(tid)
                    attempts.append(tid)
                    st.fault(ts.SEND_BEFORE_DATA, tid)
                    params = [
                        f"XBINDING={auth.xtext_encode(cur.binding)}",
                        f"XREQUEST={auth.xtext_encode(cur.requested)}",
                        f"XMMOVEID={auth.xtext_encode(cur.mmove_id)}",
                        f"XQID={auth.xtext_encode(cur.id)}",
                        f"XORIGIN={auth.xtext_encode(cur.origin)}",
                        f"{ts.TID_PARAM}={tid}",
                        f"{ts.SENDER_PARAM}={auth.xtext_encode(helo)}",
                        *([f"{ts.DOUBT_PARAM}={cur.delivering!r}"] if cur.delivering else []),
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
                    attempts.pop()
                    removes.start_soon(forget, cur, tid)
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
    finally:
        # Attempts without a 250 are over: from now on this node answers "aborted"
        # for them, and it will never commit them.
        st.inflight.difference_update(attempts)
    # A refusal leaves the session usable: what did move is confirmed all the same.
    if moved and session is not None and (failure is None or isinstance(failure, MoveFailed)):
        err = await _confirm(session, moved, st)
        if err is not None and failure is None:
            log.warning("%s: commit to %s not sent (%s): it resolves later", SERVICE, node, err)
            await session.abort()
            return len(moved)
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


async def _confirm(session: SmtpSession, tids: list[str], st: TransferState) -> BaseException | None:
    """The batched commit: one control transaction for every durable remove of the batch.

    A lost confirmation costs nothing but time: the receiver asks later.
    """
    st.fault(ts.SEND_BEFORE_COMMIT, tids[0])
    try:
        res = await session.send(
            "", (ts.CONTROL_RCPT,), ts.encode_ids(tids), [f"{ts.COMMIT_PARAM}=1"]
        )
    except (SmtpError, trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
        return exc
    st.fault(ts.SEND_AFTER_COMMIT, tids[0])
    if not 200 <= res.code < 300:
        log.warning("%s: commit refused: %s %s (the receiver resolves later)", SERVICE, res.code, res.message)
    return None
