"""On-disk record format of the spool log, and replay (pure: no I/O, no trio).

A segment file starts with a segment header, written twice (one damaged copy
is not fatal), then a sequence of records::

    header  "DVSG" | version u8 | 3 zero bytes | seed u64 | xxh64(first 16 bytes) u64   (x2)
    record  "DVR2" | kind u8 | meta_len u32 | data_len u32 | body u64 | head u64 | meta | data

``meta`` is UTF-8 JSON, ``data`` the raw message (STORE only). ``body`` is
xxh64(meta + data) and ``head`` xxh64 of the 21 bytes before it, both seeded
with the segment's random seed. The head digest covers the kind and both
lengths, so a flipped bit there cannot turn a record into another one or move
the next record boundary; and since it costs O(1) to check, recovery can
resynchronise by trying every later occurrence of the magic: a false magic
inside message data fails it (a message cannot forge one: the seed never
leaves the spool). A record whose head is authentic but whose body is not is
skipped by its (trusted) length. Segments written before this format (no
header, ``DVR1`` records whose checksum covers meta and data only) are still
read, never appended to.

Version 3 (a *preallocated* segment) differs only in how the log ends: the
file is extended ahead of the records (``fallocate``, so it reads as zeros),
and the first all-zero remainder after a record boundary is the clean end of
the log, not damage. Appends then overwrite allocated space, so their
``fdatasync`` rarely needs a journal commit for a size change. Version 2
segments (append-only: the file ends at the last record) are still read and
appended to as before.
"""

from __future__ import annotations

import json
import secrets
import struct
from collections.abc import Callable, Iterator, Mapping
from enum import Enum, IntEnum
from typing import Any

import xxhash
from attrs import evolve, frozen

MAGIC = b"DVR2"
#: Up to and including ``body``: what the head digest covers.
PREFIX = struct.Struct(">4sBIIQ")
HEADER = struct.Struct(">4sBIIQQ")
LEGACY_MAGIC = b"DVR1"
LEGACY_HEADER = struct.Struct(">4sBIIQ")
SEG_MAGIC = b"DVSG"
SEG_VERSION = 2
#: A preallocated segment: an all-zero tail after the records is the end of the log.
SEG_VERSION_PREALLOC = 3
_SEG_VERSIONS = (SEG_VERSION, SEG_VERSION_PREALLOC)
#: Disk sectors: a zero-filled aligned one inside a preallocated segment's damaged tail
#: was never written (a torn batch), whatever landed after it.
SECTOR = 512
SEG_COPY = struct.Struct(">4sB3xQQ")
SEG_HEADER_SIZE = 2 * SEG_COPY.size
#: Metadata larger than this is refused when writing and treated as corruption
#: when reading (guards replay memory).
MAX_META = 16 << 20
#: Received transfer keys per SEEN record (keeps each record far below MAX_META).
SEEN_CHUNK = 5000


class RecordTooLarge(ValueError):
    """The metadata (e.g. a huge recipient list) does not fit in one record."""


class Kind(IntEnum):
    STORE = 1
    UPDATE = 2
    REMOVE = 3
    #: Checkpoint of received mmove transfer keys (written at the start of each segment).
    SEEN = 4


@frozen
class QueuedMessage:
    """Metadata of one queued message (the data stays on disk, see ``Spool.read_data``)."""

    id: str
    mail_from: str
    rcpt_to: tuple[str, ...]
    #: The concrete binding the message is assigned to now (``default``: no DuraVIP).
    binding: str
    #: What the assignment rule asked for (a binding, a group, or ``default``); rebind re-resolves it.
    requested: str
    #: Node that first accepted the message.
    origin: str
    #: Stable identity across moves (the first queue id).
    mmove_id: str
    size: int
    received_at: float
    attempts: int = 0
    #: Wall-clock time (``time.time()``) of the next delivery attempt.
    next_at: float = 0.0
    #: Key of the mmove transfer that brought this copy here (dedup), if any.
    transfer_key: str | None = None
    #: Two-phase mmove: the sending node while this copy awaits its commit (not
    #: deliverable, not movable); ``None``: live.
    pending: str | None = None
    #: Wall time a delivery of this copy started whose outcome is not recorded yet
    #: (0: none). Set when a batch starts: after a crash it marks a delivery in doubt.
    delivering: float = 0.0


#: Fields ``update`` may change; everything else is fixed at store time.
MUTABLE = frozenset(
    {"binding", "requested", "attempts", "next_at", "rcpt_to", "pending", "delivering"}
)
#: Prefixes of the durable marks a ``REMOVE`` may carry (kept in ``ReplayState.seen``
#: and its ``SEEN`` checkpoints): a transfer id this node committed (it sent the
#: message and deleted its copy), and a Message-ID it delivered to the smarthost.
COMMITTED = "c:"
DELIVERED = "m:"
#: ``REMOVE`` meta field -> mark prefix.
MARKS = {"tid": COMMITTED, "msgid": DELIVERED}


@frozen
class Record:
    kind: Kind
    meta: Mapping[str, Any]
    #: Offset of the data inside the segment, and its length.
    data_offset: int
    data_len: int
    #: Offset of the record's header and its total length.
    offset: int
    length: int


def new_seed() -> int:
    """A segment seed: random, so record checksums cannot be forged from outside the spool."""
    return secrets.randbits(64)


def segment_header(seed: int, *, preallocated: bool = False) -> bytes:
    """The two identical header copies a segment starts with (version 3 if ``preallocated``)."""
    version = SEG_VERSION_PREALLOC if preallocated else SEG_VERSION
    head = struct.pack(">4sB3xQ", SEG_MAGIC, version, seed)
    one = head + xxhash.xxh64_intdigest(head).to_bytes(8, "big")
    return one + one


def encode(kind: Kind, meta: Mapping[str, Any], data: bytes = b"", *, seed: int) -> bytes:
    """One record for a segment whose header carries ``seed``, ready to append."""
    m = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    if len(m) > MAX_META:
        raise RecordTooLarge(f"record metadata of {len(m)} bytes exceeds {MAX_META}")
    h = xxhash.xxh64(m, seed=seed)
    h.update(data)
    prefix = PREFIX.pack(MAGIC, int(kind), len(m), len(data), h.intdigest())
    head = xxhash.xxh64_intdigest(prefix, seed=seed).to_bytes(8, "big")
    return b"".join((prefix, head, m, data))


def seen_records(seen: Mapping[str, float], *, seed: int) -> bytes:
    """The SEEN checkpoint: every received transfer key, in chunks of ``SEEN_CHUNK``."""
    items = list(seen.items())
    chunks = [items[i : i + SEEN_CHUNK] for i in range(0, len(items), SEEN_CHUNK)] or [[]]
    return b"".join(encode(Kind.SEEN, {"keys": dict(c)}, seed=seed) for c in chunks)


def meta_of(msg: QueuedMessage) -> dict[str, Any]:
    return {
        "id": msg.id,
        "mail_from": msg.mail_from,
        "rcpt_to": list(msg.rcpt_to),
        "binding": msg.binding,
        "requested": msg.requested,
        "origin": msg.origin,
        "mmove_id": msg.mmove_id,
        "size": msg.size,
        "received_at": msg.received_at,
        "attempts": msg.attempts,
        "next_at": msg.next_at,
        "transfer_key": msg.transfer_key,
        **({"pending": msg.pending} if msg.pending is not None else {}),
        **({"delivering": msg.delivering} if msg.delivering else {}),
    }


def message_of(meta: Mapping[str, Any]) -> QueuedMessage:
    return QueuedMessage(
        id=str(meta["id"]),
        mail_from=str(meta["mail_from"]),
        rcpt_to=tuple(str(r) for r in meta["rcpt_to"]),
        binding=str(meta["binding"]),
        requested=str(meta["requested"]),
        origin=str(meta["origin"]),
        mmove_id=str(meta["mmove_id"]),
        size=int(meta["size"]),
        received_at=float(meta["received_at"]),
        attempts=int(meta["attempts"]),
        next_at=float(meta["next_at"]),
        transfer_key=None if meta.get("transfer_key") is None else str(meta["transfer_key"]),
        pending=None if meta.get("pending") is None else str(meta["pending"]),
        delivering=float(meta.get("delivering", 0.0)),
    )


def apply_marks(meta: Mapping[str, Any], seen: dict[str, float]) -> None:
    """The durable marks of a ``REMOVE`` record (see ``MARKS``) into ``seen``."""
    at = float(meta.get("at", 0.0))
    for field, prefix in MARKS.items():
        if meta.get(field) is not None:
            seen.setdefault(prefix + str(meta[field]), at)


class Damage(Enum):
    #: An append cut short by a crash: never acknowledged, nothing valid after it.
    TORN = "torn"
    #: Bytes that were written whole and are now wrong (media, firmware, a stray write).
    CORRUPT = "corrupt"


@frozen
class Damaged:
    """A byte range of a segment that holds no valid record."""

    offset: int
    length: int
    kind: Damage


@frozen
class SegmentScan:
    records: list[Record]
    #: The segment's seed; ``None`` for a legacy (``DVR1``) or unreadable segment.
    seed: int | None
    legacy: bool
    #: Where the records start (after the segment header, if any).
    body_start: int
    damage: list[Damaged]
    #: A version 3 segment (zero tail = end of the log).
    preallocated: bool = False
    #: Where the last valid record ends (the next append goes there; damage is cut off).
    end: int = 0

    @property
    def corrupt(self) -> list[Damaged]:
        return [d for d in self.damage if d.kind is Damage.CORRUPT]

    @property
    def torn(self) -> Damaged | None:
        return next((d for d in self.damage if d.kind is Damage.TORN), None)


# What parsing at one offset found.
_OK, _NONE, _SKIP, _SHORT = range(4)
_Parsed = tuple[int, int, "Record | None"]


def _seg_copy(buf: bytes, off: int) -> tuple[int, int] | None:
    """(seed, version) of a header copy, or ``None`` if it is not an authentic one."""
    if len(buf) < off + SEG_COPY.size:
        return None
    magic, version, seed, check = SEG_COPY.unpack_from(buf, off)
    if magic != SEG_MAGIC or version not in _SEG_VERSIONS:
        return None
    if xxhash.xxh64_intdigest(buf[off : off + 16]) != check:
        return None
    return int(seed), int(version)


def _meta(buf: bytes, start: int, mlen: int) -> dict[str, Any] | None:
    try:
        meta = json.loads(buf[start : start + mlen])
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def _parse(buf: bytes, pos: int, seed: int) -> _Parsed:
    """A record at ``pos``: ``_NONE`` if no authentic head starts there, ``_SKIP`` (with
    its end) if the head is authentic but the body is not, ``_SHORT`` if it runs past EOF."""
    n = len(buf)
    if pos + HEADER.size > n or buf[pos : pos + 4] != MAGIC:
        return _NONE, 0, None
    _, kind, mlen, dlen, body, head = HEADER.unpack_from(buf, pos)
    if xxhash.xxh64_intdigest(buf[pos : pos + PREFIX.size], seed=seed) != head:
        return _NONE, 0, None
    start = pos + HEADER.size
    end = start + mlen + dlen
    if end > n:
        return _SHORT, end, None
    if mlen > MAX_META or kind not in Kind._value2member_map_:
        return _SKIP, end, None
    view = memoryview(buf)
    h = xxhash.xxh64(view[start : start + mlen], seed=seed)
    h.update(view[start + mlen : end])
    if h.intdigest() != body:
        return _SKIP, end, None
    meta = _meta(buf, start, mlen)
    if meta is None:
        return _SKIP, end, None
    return _OK, end, Record(Kind(kind), meta, start + mlen, dlen, pos, end - pos)


def _parse_legacy(buf: bytes, pos: int, _seed: int) -> _Parsed:
    """A ``DVR1`` record: lengths are not authenticated, so a bad one is never skipped over."""
    n = len(buf)
    if pos + LEGACY_HEADER.size > n:
        return _NONE, 0, None
    magic, kind, mlen, dlen, digest = LEGACY_HEADER.unpack_from(buf, pos)
    if magic != LEGACY_MAGIC or mlen > MAX_META or kind not in Kind._value2member_map_:
        return _NONE, 0, None
    start = pos + LEGACY_HEADER.size
    end = start + mlen + dlen
    if end > n:
        return _SHORT, end, None
    view = memoryview(buf)
    h = xxhash.xxh64(view[start : start + mlen])
    h.update(view[start + mlen : end])
    meta = _meta(buf, start, mlen) if h.intdigest() == digest else None
    if meta is None:
        return _NONE, 0, None
    return _OK, end, Record(Kind(kind), meta, start + mlen, dlen, pos, end - pos)


def scan(buf: bytes) -> SegmentScan:
    """Every valid record of a segment, and every damaged range between and after them.

    After a bad spot, parsing resumes at the next offset where a valid record
    starts (the next occurrence of the magic whose head verifies), so damage
    costs only the records it touches. A damaged tail with nothing valid after
    it is TORN if it is a cut-short record (or zeros), else CORRUPT.
    """
    damage: list[Damaged] = []
    copies = [_seg_copy(buf, 0), _seg_copy(buf, SEG_COPY.size)]
    good = [s for s in copies if s is not None]
    parse: Callable[[bytes, int, int], _Parsed]
    prealloc = False
    n = len(buf)
    #: Past the last non-zero byte (a preallocated segment's zero tail is not data).
    data_end = n
    if good:
        seed: int | None = good[0][0]
        prealloc = good[0][1] == SEG_VERSION_PREALLOC
        if prealloc:
            data_end = len(buf.rstrip(b"\0"))
        legacy = False
        pos = SEG_HEADER_SIZE
        magic = MAGIC
        parse = _parse
        for i, s in enumerate(copies):
            if s is None:
                damage.append(Damaged(i * SEG_COPY.size, SEG_COPY.size, Damage.CORRUPT))
    elif SEG_MAGIC in (buf[:4], buf[SEG_COPY.size : SEG_COPY.size + 4]):
        # Both header copies damaged: without the seed no record can be verified.
        return SegmentScan([], None, False, 0, [Damaged(0, len(buf), Damage.CORRUPT)], end=0)
    else:
        seed, legacy, pos, magic, parse = None, True, 0, LEGACY_MAGIC, _parse_legacy
    body_start = pos
    records: list[Record] = []
    bad_from: int | None = None
    while pos < n:
        status, end, rec = parse(buf, pos, seed or 0)
        if status != _OK and pos >= data_end and bad_from is None:
            break  # a preallocated segment's zero tail: the clean end of the log
        if status == _OK:
            assert rec is not None
            if bad_from is not None:
                damage.append(Damaged(bad_from, pos - bad_from, Damage.CORRUPT))
                bad_from = None
            records.append(rec)
            pos = end
            continue
        if bad_from is None:
            bad_from = pos
        if status == _SKIP:
            pos = end
            continue
        nxt = buf.find(magic, pos + 1)
        pos = n if nxt < 0 else nxt
    if bad_from is not None and prealloc and bad_from >= data_end:
        bad_from = None  # damage before the zero tail was closed by a valid record
    if bad_from is not None:
        if prealloc:
            kind = _prealloc_tail_kind(buf, bad_from, data_end, seed or 0)
            damage.append(Damaged(bad_from, data_end - bad_from, kind))
        else:
            damage.append(Damaged(bad_from, n - bad_from, _tail_kind(buf, bad_from, seed, parse)))
    last = records[-1].offset + records[-1].length if records else body_start
    return SegmentScan(records, seed, legacy, body_start, damage, prealloc, last)


def _prealloc_tail_kind(buf: bytes, pos: int, data_end: int, seed: int) -> Damage:
    """A damaged tail of a preallocated segment (no valid record after ``pos``).

    Pages of an append reach the disk in any order, and what did not reach it
    reads as zeros. So a tail is TORN when the record at ``pos`` runs past what
    was written (past EOF, or into the zero tail), or when the damaged range
    holds an aligned all-zero sector (never written) or starts with zeros. A
    fully written range that does not verify (a bit flip in the last record) is
    CORRUPT.
    """
    status, end, _ = _parse(buf, pos, seed)
    if status == _SHORT or (status == _SKIP and end > data_end):
        return Damage.TORN
    if data_end - pos < HEADER.size or buf[pos] == 0:
        return Damage.TORN
    zero = bytes(SECTOR)
    first = -(-pos // SECTOR) * SECTOR
    for at in range(first, data_end - SECTOR + 1, SECTOR):
        if buf[at : at + SECTOR] == zero:
            return Damage.TORN
    return Damage.CORRUPT


def _tail_kind(
    buf: bytes, pos: int, seed: int | None, parse: Callable[[bytes, int, int], _Parsed]
) -> Damage:
    tail = buf[pos:]
    head_size = LEGACY_HEADER.size if seed is None else HEADER.size
    if len(tail) < head_size or not tail.strip(b"\0"):
        return Damage.TORN
    if parse(buf, pos, seed or 0)[0] == _SHORT:
        return Damage.TORN
    return Damage.CORRUPT


@frozen
class Located:
    """Where a live message's data lives."""

    segment: int
    data_offset: int
    data_len: int


class ReplayState:
    """In-memory queue state rebuilt by applying records in log order."""

    def __init__(self) -> None:
        self.messages: dict[str, QueuedMessage] = {}
        self.where: dict[str, Located] = {}
        #: Received mmove transfer keys -> wall time first seen.
        self.seen: dict[str, float] = {}
        #: Live messages and their data bytes per segment (compaction decisions in O(1)).
        self.seg_live: dict[int, int] = {}
        self.seg_bytes: dict[int, int] = {}

    def place(self, mid: str, loc: Located) -> None:
        """Record where ``mid``'s data lives (replacing any earlier location)."""
        self.unplace(mid)
        self.where[mid] = loc
        self.seg_live[loc.segment] = self.seg_live.get(loc.segment, 0) + 1
        self.seg_bytes[loc.segment] = self.seg_bytes.get(loc.segment, 0) + loc.data_len

    def unplace(self, mid: str) -> None:
        old = self.where.pop(mid, None)
        if old is not None:
            self.seg_live[old.segment] -= 1
            self.seg_bytes[old.segment] -= old.data_len

    def apply(self, segment: int, rec: Record) -> None:
        meta = rec.meta
        if rec.kind is Kind.STORE:
            msg = message_of(meta)
            self.messages[msg.id] = msg
            self.place(msg.id, Located(segment, rec.data_offset, rec.data_len))
            if msg.transfer_key is not None:
                self.seen.setdefault(msg.transfer_key, msg.received_at)
        elif rec.kind is Kind.UPDATE:
            mid = str(meta["id"])
            old = self.messages.get(mid)
            if old is not None:
                self.messages[mid] = apply_changes(old, meta["changes"])
        elif rec.kind is Kind.REMOVE:
            mid = str(meta["id"])
            self.messages.pop(mid, None)
            self.unplace(mid)
            apply_marks(meta, self.seen)
        elif rec.kind is Kind.SEEN:
            for key, ts in meta["keys"].items():
                self.seen.setdefault(str(key), float(ts))

    def iter_segment(self, segment: int) -> Iterator[str]:
        return (mid for mid, loc in self.where.items() if loc.segment == segment)


def apply_changes(msg: QueuedMessage, changes: Mapping[str, Any]) -> QueuedMessage:
    bad = set(changes) - MUTABLE
    if bad:
        raise ValueError(f"immutable spool fields: {sorted(bad)}")
    norm: dict[str, Any] = dict(changes)
    if "rcpt_to" in norm:
        norm["rcpt_to"] = tuple(norm["rcpt_to"])
    return evolve(msg, **norm)
