"""The durable mail queue: an append-only log with group commit.

Why a log: one ``fdatasync`` covers every record appended since the last one,
so concurrent ``store()`` calls share a single flush (group commit) instead of
paying a file and a directory fsync each. A caller returns only after the
flush that covers its record, so an SMTP ``250`` always follows durability.
Crash safety comes from the record checksum: a torn tail is invisible on
replay and is truncated at open. Damage anywhere else costs only the records
it touches: recovery resynchronises on the next valid record, keeps a copy of
the damaged segment and reports CORRUPTION (never as a torn write). Old
segments are dropped once nothing live is in them; a segment pinned by a few
long-deferred messages is compacted by re-appending those messages to the
active segment. See ``docs/mail.md``.

This module is the :class:`Spool` itself (store/update/remove, group commit,
compaction); open-time recovery is :mod:`~duravip.mail.spool_recovery`, the
private durable files :mod:`~duravip.mail.spool_files`, the record format
:mod:`~duravip.mail.spool_format`. Their public names are re-exported here.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import trio
from attrs import Factory, define, field

from duravip.mail.spool_files import (
    Preallocator,
    create_segment_file,
    fsync_dir,
    prepare_dirs,
    pwrite_all,
    seg_path,
    write_private_file,
)
from duravip.mail.spool_flush import FlushRunner
from duravip.mail.spool_format import (
    Kind,
    Located,
    QueuedMessage,
    ReplayState,
    apply_changes,
    apply_marks,
    encode,
    meta_of,
    new_seed,
    seen_records,
    segment_header,
)
from duravip.mail.spool_items import Batch as _Batch
from duravip.mail.spool_items import Item as _Item
from duravip.mail.spool_items import NewMessage, SpoolError, new_queue_id
from duravip.mail.spool_recovery import RecoveryReport, recover_log

__all__ = [
    "NewMessage",
    "RecoveryReport",
    "Spool",
    "SpoolError",
    "new_queue_id",
    "write_private_file",
]

log = logging.getLogger(__name__)


@define
class Spool:
    """Open with :meth:`open`; use from one Trio run only."""

    #: ``preallocate`` of the daemon's spool (``mail.service``): zeros written ahead in
    #: 4 MiB steps (one size-changing flush per step); at most that much unused per segment.
    DAEMON_PREALLOCATE: ClassVar[int] = 4 << 20

    root: Path
    segment_size: int
    seen_ttl: float
    max_segments: int
    state: ReplayState = Factory(ReplayState)
    _fds: dict[int, int] = Factory(dict)
    _active: int = 0
    _active_size: int = 0
    #: Bytes kept allocated ahead of the appends (0: append-only segments), see ``open``.
    preallocate: int = 0
    _pre: Preallocator = Factory(lambda self: Preallocator(self.preallocate), takes_self=True)
    _wfd: int = -1
    _open_batch: _Batch = Factory(_Batch)
    #: The last sealed batch (completion is chained in write order).
    _tail: _Batch | None = None
    _io_lock: trio.Lock = Factory(trio.Lock)
    #: Flushes in flight at once.
    max_inflight: int = 2
    _slots: trio.Semaphore = Factory(
        lambda self: trio.Semaphore(self.max_inflight), takes_self=True
    )
    _syncing: int = 0
    _sync_changed: trio.Event = Factory(trio.Event)
    #: Roll-backs so far, as (epoch before it, segment, offset cut to).
    _epoch: int = 0
    _rollbacks: list[tuple[int, int, int]] = Factory(list)
    _compacting: bool = False
    _relocating: set[str] = Factory(set)
    _pending_ops: Counter[str] = Factory(Counter)
    _broken: str | None = None
    _closed: bool = False
    #: Group-commit window: when the last flush carried several writers, wait up to this
    #: long for as many to queue again, so writers answered by that flush join the next
    #: one instead of alternating between two half-full flushes (cf. PostgreSQL's
    #: commit_delay). A lone writer never waits.
    commit_delay: float = 0.002
    _last_batch: int = 0
    _gathered: trio.Event = Factory(trio.Event)
    flushes: int = field(default=0)
    flusher: FlushRunner = Factory(FlushRunner)
    #: Seed of the records appended (the active segment's, see ``spool_format``).
    _seed: int = 0
    recovery: RecoveryReport = Factory(RecoveryReport)

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def bounce_dir(self) -> Path:
        return self.root / "bounces"

    # ---- open / recovery -------------------------------------------------

    @classmethod
    def open(
        cls,
        path: Path | str,
        *,
        segment_size: int = 64 << 20,
        seen_ttl: float = 7 * 86400.0,
        max_segments: int = 8,
        preallocate: int = 0,
    ) -> Spool:
        """Recover the queue from ``path`` (created if missing). Blocking: call at start-up.

        ``preallocate`` > 0: new segments are preallocated (format version 3) and
        kept about that many bytes of written zeros ahead of the appends (steps of
        that size, see ``spool_files.ZeroFill``), so a flush overwrites written
        space instead of growing the file and never waits for the journal.
        """
        self = cls(Path(path), segment_size, seen_ttl, max_segments, preallocate=preallocate)
        prepare_dirs(self.root, (self.log_dir, self.bounce_dir))
        segs, res = recover_log(self.log_dir, self.state, self.recovery)
        for seg in segs:
            self._fds[seg] = os.open(self._seg_path(seg), os.O_RDONLY)
        if res is not None and res.seed is not None and res.preallocated == (preallocate > 0):
            self._seed = res.seed
            self._active = segs[-1]
            self._active_size = res.end
            self._wfd = os.open(self._seg_path(self._active), os.O_WRONLY)
            self._pre.reset(self._active, os.fstat(self._wfd).st_size)
        else:
            # New spool, or the last segment is legacy/unreadable (never appended to), or
            # of the other kind (preallocated or not) than asked for: a new segment.
            self._seed = new_seed()
            self._create_segment(segs[-1] + 1 if segs else 1)
        return self

    def _seg_path(self, seg: int) -> Path:
        return seg_path(self.log_dir, seg)

    def _create_segment(self, seg: int) -> None:
        """New active segment: header and a checkpoint of received transfer keys, made
        durable under a temporary name first, so a segment file is never half made."""
        p = self._seg_path(seg)
        head = segment_header(self._seed, preallocated=self.preallocate > 0)
        head += seen_records(self.state.seen, seed=self._seed)
        wfd = create_segment_file(p, head, self.preallocate and len(head) + self.preallocate)
        if self._wfd >= 0:
            os.close(self._wfd)
        self._wfd = wfd
        self._fds[seg] = os.open(p, os.O_RDONLY)
        self._active = seg
        self._active_size = len(head)
        self._pre.reset(seg, os.fstat(wfd).st_size)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pre.close()
        self.flusher.close()
        os.close(self._wfd)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # ---- reads ------------------------------------------------------------

    def iter(self) -> Iterator[QueuedMessage]:
        """Every queued message in store order (a snapshot; dicts keep insertion order)."""
        return iter(list(self.state.messages.values()))

    def get(self, qid: str) -> QueuedMessage | None:
        return self.state.messages.get(qid)

    def __len__(self) -> int:
        return len(self.state.messages)

    def read_data(self, qid: str) -> bytes:
        """The message body; raises ``KeyError`` if it is not queued."""
        loc = self.state.where[qid]
        return os.pread(self._fds[loc.segment], loc.data_len, loc.data_offset)

    def has_mmove_id(self, key: str) -> bool:
        """Whether an mmove transfer with this key was already made durable here."""
        return key in self.state.seen

    # ---- writes -----------------------------------------------------------

    async def store(self, msg: NewMessage) -> str:
        qid = msg.queue_id or new_queue_id()
        if qid in self.state.messages:
            raise ValueError(f"queue id {qid} already queued")
        qm = QueuedMessage(
            id=qid,
            mail_from=msg.mail_from,
            rcpt_to=msg.rcpt_to,
            binding=msg.binding,
            requested=msg.requested,
            origin=msg.origin,
            mmove_id=msg.mmove_id or qid,
            size=len(msg.data),
            received_at=time.time(),
            attempts=msg.attempts,
            next_at=msg.next_at,
            transfer_key=msg.transfer_key,
            pending=msg.pending,
        )

        def durable(seg: int, data_off: int) -> None:
            self.state.messages[qid] = qm
            self.state.place(qid, Located(seg, data_off, len(msg.data)))
            if qm.transfer_key is not None:
                self.state.seen.setdefault(qm.transfer_key, qm.received_at)

        await self._commit(_Item(encode(Kind.STORE, meta_of(qm), msg.data, seed=self._seed), len(msg.data), durable))
        return qid

    async def update(self, qid: str, **changes: Any) -> QueuedMessage:
        """Durably change ``binding``, ``requested``, ``attempts``, ``next_at`` or ``rcpt_to``."""
        old = self.state.messages.get(qid)
        if old is None:
            raise KeyError(qid)
        apply_changes(old, changes)  # validates field names before anything is written
        wire = {k: list(v) if k == "rcpt_to" else v for k, v in changes.items()}

        def durable(_seg: int, _off: int) -> None:
            cur = self.state.messages.get(qid)
            if cur is not None:
                self.state.messages[qid] = apply_changes(cur, changes)

        self._pending_ops[qid] += 1
        try:
            await self._commit(_Item(encode(Kind.UPDATE, {"id": qid, "changes": wire}, seed=self._seed), 0, durable))
        finally:
            self._dec_pending(qid)
        return self.state.messages.get(qid, old)

    async def remove(self, qid: str, **marks: str) -> None:
        """Durably drop ``qid``, with ``marks`` (``spool_format.MARKS``) in the same record."""
        if qid not in self.state.messages:
            return
        meta = {"id": qid, **marks, **({"at": time.time()} if marks else {})}

        def durable(_seg: int, _off: int) -> None:
            self.state.messages.pop(qid, None)
            self.state.unplace(qid)
            apply_marks(meta, self.state.seen)

        self._pending_ops[qid] += 1
        try:
            await self._commit(_Item(encode(Kind.REMOVE, meta, seed=self._seed), 0, durable))
        finally:
            self._dec_pending(qid)

    def _dec_pending(self, qid: str) -> None:
        self._pending_ops[qid] -= 1
        if self._pending_ops[qid] <= 0:
            del self._pending_ops[qid]

    async def _commit(self, item: _Item) -> None:
        """Append ``item`` and return once it is durable.

        Group commit, pipelined: the first writer into the open batch leads it
        (seals, writes, ``fdatasync``). While a batch's flush is in flight the
        next batch gathers and may start its own flush (at most
        ``max_inflight`` at once: concurrent flushes of one file finish much
        sooner than back-to-back ones on this kind of disk). Batches complete
        strictly in write order, so memory always matches a prefix of the log.
        """
        if self._broken is not None:
            raise SpoolError(self._broken)
        if self._closed:
            raise SpoolError("spool closed")
        batch = self._open_batch
        batch.items.append(item)
        if len(batch.items) >= self._last_batch:
            self._gathered.set()
        if batch.led:
            await batch.done.wait()
        else:
            batch.led = True
            # A flush is bounded disk I/O; finishing it under cancellation keeps
            # the batches behind this one moving.
            with trio.CancelScope(shield=True):
                await self._lead(batch)
        if batch.error is not None:
            raise SpoolError(f"spool write failed: {batch.error}") from batch.error

    async def _lead(self, b: _Batch) -> None:
        async with self._slots:
            if self.commit_delay > 0 and 1 < self._last_batch > len(b.items):
                self._gathered = trio.Event()
                with trio.move_on_after(self.commit_delay):
                    await self._gathered.wait()
            async with self._io_lock:
                if self._open_batch is b:
                    self._open_batch = _Batch()
                self._last_batch = len(b.items)
                prev, self._tail = self._tail, b
                rotate = self._active_size >= self.segment_size
                if rotate:
                    # The old segment's fd is closed on rotation: no flush may be using it.
                    while self._syncing:
                        await self._sync_changed.wait()
                    self._prune_seen()
                b.epoch = self._epoch
                end = self._active_size + sum(len(it.data) for it in b.items)
                while not rotate and self._pre.ahead(self._active, end):
                    await trio.sleep(0.0005)  # appends outran the zero fill (never seen)
                try:
                    if rotate:
                        placed = await trio.to_thread.run_sync(self._write_sync, b.items, rotate)
                    else:
                        # A page-cache append of a few KB: cheaper inline than a thread hop.
                        placed = self._write_sync(b.items, rotate)
                except OSError as exc:
                    b.error = exc
                    log.error("spool: write failed: %s", exc)
                    placed = []
                else:
                    b.segment, b.start = placed[0]
                fd = self._wfd
                self._syncing += 1
            sync_error: OSError | None = None
            if b.error is None:
                try:
                    await self.flusher.fdatasync(fd)  # inline while the disk is fast
                except OSError as exc:
                    sync_error = exc
            self._syncing -= 1
            self._sync_changed.set()
            self._sync_changed = trio.Event()
        if prev is not None:
            await prev.done.wait()
        async with self._io_lock:
            if b.error is None and self._rolled_back(b):
                b.error = OSError("an earlier flush failed; this batch was rolled back")
            elif b.error is None and sync_error is not None:
                b.error = sync_error
                log.error("spool: flush failed: %s", sync_error)
                await trio.to_thread.run_sync(self._roll_back, b.start)
            elif b.error is None:
                self.flushes += 1
                for it, (seg, off) in zip(b.items, placed, strict=True):
                    it.on_durable(seg, off + len(it.data) - it.payload_len)
        for it in b.items:
            if it.reloc is not None:
                self._relocating.discard(it.reloc)
        b.done.set()
        if not self._compacting:
            self._compacting = True
            try:
                await self._maybe_compact()
            finally:
                self._compacting = False

    def _write_sync(self, items: list[_Item], rotate: bool) -> list[tuple[int, int]]:
        """Append the batch (no flush); on error, cut the file back to where it was."""
        if rotate:
            self._create_segment(self._active + 1)
        start = self._active_size
        buf = b"".join(it.data for it in items)
        try:
            pwrite_all(self._wfd, buf, start)
        except OSError:
            self._roll_back(start)
            raise
        placed = []
        off = start
        for it in items:
            placed.append((self._active, off))
            off += len(it.data)
        self._active_size = off
        self._pre.wrote(self._seg_path(self._active), self._active, off, self.segment_size)
        return placed

    def _roll_back(self, start: int) -> None:
        """Truncate the active segment to ``start``; later batches are void (new epoch)."""
        try:
            os.ftruncate(self._wfd, start)
            os.fdatasync(self._wfd)
        except OSError as exc:
            self._broken = f"cannot roll back a failed append: {exc}"
            return
        self._rollbacks.append((self._epoch, self._active, start))
        self._active_size = start
        self._pre.reset(self._active, start)
        self._epoch += 1

    def _rolled_back(self, b: _Batch) -> bool:
        return any(
            e >= b.epoch and seg == b.segment and b.start >= off for e, seg, off in self._rollbacks
        )

    def _prune_seen(self) -> None:
        cutoff = time.time() - self.seen_ttl
        for k in [k for k, t in self.state.seen.items() if t < cutoff]:
            del self.state.seen[k]

    async def _maybe_compact(self) -> None:
        """Drop the oldest segment when nothing live is in it; relocate stragglers when pinned."""
        while len(self._fds) > 1:
            oldest = min(self._fds)
            if not self.state.seg_live.get(oldest, 0):
                await trio.to_thread.run_sync(self._drop_segment, oldest)
                continue
            live_bytes = self.state.seg_bytes.get(oldest, 0)
            if len(self._fds) <= self.max_segments and live_bytes * 4 >= self.segment_size:
                return
            for mid in list(self.state.iter_segment(oldest)):
                if self._pending_ops.get(mid) or mid in self._relocating:
                    continue
                self._relocate(mid)
            batch = self._open_batch
            if batch.items and not batch.led:
                batch.led = True
                await self._lead(batch)
                if batch.error is not None:
                    return  # retried after a later flush
                continue
            return

    def _relocate(self, mid: str) -> None:
        msg = self.state.messages[mid]
        data = self.read_data(mid)

        def durable(seg: int, data_off: int) -> None:
            if mid in self.state.where:
                self.state.place(mid, Located(seg, data_off, len(data)))

        self._relocating.add(mid)
        self._open_batch.items.append(
            _Item(encode(Kind.STORE, meta_of(msg), data, seed=self._seed), len(data), durable, reloc=mid)
        )

    def _drop_segment(self, seg: int) -> None:
        self.state.seg_live.pop(seg, None)
        self.state.seg_bytes.pop(seg, None)
        os.close(self._fds.pop(seg))
        self._seg_path(seg).unlink()
        fsync_dir(self.log_dir)
        log.info("spool: dropped segment %d", seg)
