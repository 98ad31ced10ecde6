"""Delivery to the smarthost: one connection per batch, source address = the binding's IP.

Outcomes are written to the spool before anything else happens: accepted
messages are removed, temporary failures (4xx, connection errors, timeouts)
get ``attempts + 1`` and an exponential-backoff ``next_at``, permanent
failures (5xx) leave a bounce file under ``bounces/`` and are removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, MutableMapping, Sequence
from pathlib import Path

import trio

from duravip.config.model import HostPort
from duravip.mail import transfer_state as ts
from duravip.mail.dedup import DedupWindow, dedup_key
from duravip.mail.smtpclient import SmtpError, SmtpSession, open_tcp
from duravip.mail.spool import Spool, SpoolError, write_private_file
from duravip.mail.spool_format import QueuedMessage

log = logging.getLogger(__name__)


def backoff(attempts: int, base: float, cap: float) -> float:
    """Delay before attempt ``attempts + 1``: ``base * 2**(attempts-1)``, at most ``cap``."""
    if attempts <= 0:
        return 0.0
    return float(min(cap, base * (2.0 ** min(attempts - 1, 62))))


def _bump(counters: MutableMapping[str, int], key: str, n: int = 1) -> None:
    counters[key] = counters.get(key, 0) + n


def write_bounce(
    bounce_dir: Path, msg: QueuedMessage, data: bytes, reason: str, rcpts: Sequence[str]
) -> Path:
    """A bounce file: one JSON line (envelope and reason), a blank line, then the message."""
    head = {
        "queue_id": msg.id,
        "mmove_id": msg.mmove_id,
        "mail_from": msg.mail_from,
        "rcpt_to": list(rcpts),
        "binding": msg.binding,
        "reason": reason,
        "time": time.time(),
    }
    final = bounce_dir / f"{msg.id}-{int(time.time() * 1000)}.bounce"
    # 0600 whatever the umask; the bounces/ directory is fsynced after the rename.
    write_private_file(final, json.dumps(head).encode() + b"\n\n" + data)
    return final


class Deliverer:
    """Delivers batches for one node; shares the spool and counters with the service."""

    def __init__(
        self,
        spool: Spool,
        counters: MutableMapping[str, int],
        *,
        helo: str,
        retry_base: float,
        retry_max: float,
        timeout: float = 60.0,
        dedup: DedupWindow | None = None,
        stalled_since: Callable[[float], bool] | None = None,
    ) -> None:
        self.spool = spool
        self.counters = counters
        self.helo = helo
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.timeout = timeout
        self.dedup = dedup if dedup is not None else DedupWindow()
        #: A stall since ``t`` (``outbound.StallWatch``): do not send the data.
        self.stalled_since = stalled_since
        #: Crash-point test hook (``transfer_state.DELIVER_POINTS``).
        self.fault: ts.Fault = ts.no_fault

    async def defer(
        self,
        msg: QueuedMessage,
        reason: str,
        rcpts: Sequence[str] | None = None,
        *,
        in_doubt: bool = False,
    ) -> None:
        cur = self.spool.get(msg.id)
        if cur is None:
            return
        attempts = cur.attempts + 1
        delay = backoff(attempts, self.retry_base, self.retry_max)
        changes: dict[str, object] = {"attempts": attempts, "next_at": time.time() + delay}
        if not in_doubt:
            changes["delivering"] = 0.0
        if rcpts is not None:
            changes["rcpt_to"] = tuple(rcpts)
        await self.spool.update(msg.id, **changes)
        _bump(self.counters, "deferred")
        log.info(
            "deferred %s (binding %s, attempt %d, retry in %.1fs): %s",
            msg.id,
            msg.binding,
            attempts,
            delay,
            reason,
        )

    async def bounce(self, msg: QueuedMessage, reason: str, rcpts: Sequence[str]) -> bool:
        """Write the bounce file; ``False`` if that failed (the caller keeps the message)."""
        data = self.spool.read_data(msg.id)
        try:
            path = await trio.to_thread.run_sync(
                write_bounce, self.spool.bounce_dir, msg, data, reason, rcpts
            )
        except OSError as exc:
            log.error("cannot write bounce for %s: %s", msg.id, exc)
            return False
        _bump(self.counters, "bounced")
        log.warning("bounced %s for %s: %s (%s)", msg.id, ",".join(rcpts), reason, path.name)
        return True

    async def deliver_batch(
        self, smarthost: HostPort, bind: str | None, messages: Sequence[QueuedMessage]
    ) -> None:
        """Deliver ``messages`` over one connection from ``bind``; every outcome is recorded."""
        pending = list(messages)
        try:
            stream = await open_tcp(
                str(smarthost.host), smarthost.port, bind=bind, timeout=self.timeout
            )
        except (OSError, trio.TooSlowError) as exc:
            for m in pending:
                await self.defer(m, f"connect to {smarthost} from {bind or 'any'}: {exc!r}")
            return
        session = SmtpSession(stream, timeout=self.timeout)
        doubted: set[str] | None = None  # set once this batch's marks are durable
        try:
            await session.start(self.helo)
            doubted = await self._mark(pending)
            while pending:
                msg = pending[0]
                if self.spool.get(msg.id) is None:
                    pending.pop(0)
                    continue
                msg = self.spool.get(msg.id) or msg
                data = self.spool.read_data(msg.id)
                key = dedup_key(msg, data)
                if self.dedup.recent(self.spool.state.seen, key):
                    pending.pop(0)
                    with trio.CancelScope(shield=True):
                        await self.spool.remove(msg.id)
                    _bump(self.counters, "delivery_dup_suppressed")
                    log.warning(
                        "not delivering %s: %s was delivered within the dedup window",
                        msg.id,
                        key,
                    )
                    continue
                self.fault(ts.DELIVER_BEFORE_DATA, msg.id)
                res = await session.send(
                    msg.mail_from, msg.rcpt_to, data, stalled_since=self.stalled_since, nudge=True
                )
                pending.pop(0)
                if 200 <= res.code < 300:
                    self.fault(ts.DELIVER_AFTER_250, msg.id)
                # The smarthost has answered: recording that must not be cut short
                # by a cancellation (a binding moving away, a shutdown), or a
                # delivered message would stay queued and be sent again.
                with trio.CancelScope(shield=True):
                    await self._record(
                        msg,
                        res.code,
                        res.message,
                        res.accepted,
                        [r for r, _ in res.deferred],
                        res.rejected,
                        key,
                    )
        except SmtpError as exc:
            # Recorded even when the binding is moving away (cancelled): a message
            # whose reply was lost keeps its in-doubt mark for the next attempt.
            with trio.CancelScope(shield=True):
                await session.abort()
                for i, m in enumerate(pending):
                    doubt = exc.after_data and i == 0
                    if doubt:
                        log.warning(
                            "delivery of %s: the session broke after the message was sent, "
                            "before the smarthost's reply (it may have taken it): %s",
                            m.id,
                            exc,
                        )
                    await self.defer(m, f"session with {smarthost}: {exc}", in_doubt=doubt)
            return
        except trio.Cancelled:
            # Stopped (the binding's IP leaves): a cancellation never lands between
            # a message's data and its recorded reply (both shielded), so nothing
            # left in ``pending`` was sent. Unmark it, or its next delivery would
            # look in doubt; a mark from an earlier cut-off attempt stays.
            with trio.CancelScope(shield=True):
                await session.abort()
                if doubted is not None:
                    await self._unmark([m for m in pending if m.id not in doubted])
            raise
        await session.quit()

    async def _unmark(self, batch: Sequence[QueuedMessage]) -> None:
        async def one(m: QueuedMessage) -> None:
            cur = self.spool.get(m.id)
            if cur is None or not cur.delivering:
                return
            with contextlib.suppress(KeyError, SpoolError):
                await self.spool.update(m.id, delivering=0.0)

        async with trio.open_nursery() as nursery:
            for m in batch:
                nursery.start_soon(one, m)

    async def _mark(self, batch: Sequence[QueuedMessage]) -> set[str]:
        """Durably note that these deliveries start (one shared flush); a copy still
        marked from an earlier start was cut off by a crash: it may have reached the
        smarthost, so this delivery may duplicate it (counted, logged). Returns those."""
        now = time.time()
        doubted: set[str] = set()
        self.dedup.prune(self.spool.state.seen, now)

        async def one(m: QueuedMessage) -> None:
            cur = self.spool.get(m.id)
            if cur is None:
                return
            if cur.delivering:
                doubted.add(m.id)
                _bump(self.counters, "delivery_in_doubt")
                log.warning(
                    "delivery of %s (binding %s) started at %.0f was cut off before its outcome "
                    "was recorded: sending it again may duplicate it",
                    m.id,
                    m.binding,
                    cur.delivering,
                )
            try:
                await self.spool.update(m.id, delivering=now)
            except KeyError:
                return  # delivered or moved meanwhile
            except SpoolError as exc:
                # Only the in-doubt marker is missing; the delivery itself can go on.
                log.error("delivery: cannot mark %s as being delivered: %s", m.id, exc)

        async with trio.open_nursery() as nursery:
            for m in batch:
                nursery.start_soon(one, m)
        return doubted

    async def _record(
        self,
        msg: QueuedMessage,
        code: int,
        text: str,
        accepted: Sequence[str],
        deferred: Sequence[str],
        rejected: Sequence[tuple[str, str]],
        key: str | None = None,
    ) -> None:
        reply = f"{code} {text}"
        if rejected:
            # Others may have been accepted already: a failed bounce file is only logged.
            await self.bounce(msg, "; ".join(t for _, t in rejected), [r for r, _ in rejected])
        if 200 <= code < 300:
            # The smarthost holds the message from here: a crash before the record
            # below is durable re-delivers it, so nothing else (logging, counters)
            # runs first.
            if deferred:
                await self.defer(msg, "some recipients deferred", deferred)
            elif key is not None and self.dedup.window > 0:
                # The smarthost's 250 and the delete are one durable record.
                await self.spool.remove(msg.id, msgid=key)
            else:
                await self.spool.remove(msg.id)
            self.fault(ts.DELIVER_AFTER_REMOVE, msg.id)
            _bump(self.counters, "delivered")
            log.info(
                "delivered %s via binding %s to %d recipient(s)", msg.id, msg.binding, len(accepted)
            )
            return
        refused = {x for x, _ in rejected}
        if 400 <= code < 500:
            keep = [r for r in msg.rcpt_to if r not in refused]
            if keep:
                await self.defer(msg, reply, keep if refused else None)
            else:
                await self.spool.remove(msg.id)
            return
        # 5xx for the whole transaction: every recipient not already bounced.
        rest = [r for r in msg.rcpt_to if r not in refused]
        if rest and not await self.bounce(msg, reply, rest):
            await self.defer(msg, "bounce could not be written")
            return
        await self.spool.remove(msg.id)
