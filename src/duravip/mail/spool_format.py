"""On-disk record format of the spool log, and replay (pure: no I/O, no trio).

A segment file is a sequence of records::

    magic "DVR1" | kind u8 | meta_len u32 | data_len u32 | xxh64(meta + data) u64 | meta | data

``meta`` is UTF-8 JSON, ``data`` the raw message (STORE only). A record is
visible only if its header, length and checksum are all intact, so a torn write
at the tail of a segment (a crash during append) is simply not there: replay
stops at the first bad record and reports how many bytes were good.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from enum import IntEnum
from typing import Any

import xxhash
from attrs import evolve, frozen

MAGIC = b"DVR1"
HEADER = struct.Struct(">4sBIIQ")
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


#: Fields ``update`` may change; everything else is fixed at store time.
MUTABLE = frozenset({"binding", "requested", "attempts", "next_at", "rcpt_to"})


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


def encode(kind: Kind, meta: Mapping[str, Any], data: bytes = b"") -> bytes:
    """One record, ready to append."""
    m = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    if len(m) > MAX_META:
        raise RecordTooLarge(f"record metadata of {len(m)} bytes exceeds {MAX_META}")
    h = xxhash.xxh64(m)
    h.update(data)
    return HEADER.pack(MAGIC, int(kind), len(m), len(data), h.intdigest()) + m + data


def seen_records(seen: Mapping[str, float]) -> bytes:
    """The SEEN checkpoint: every received transfer key, in chunks of ``SEEN_CHUNK``."""
    items = list(seen.items())
    chunks = [items[i : i + SEEN_CHUNK] for i in range(0, len(items), SEEN_CHUNK)] or [[]]
    return b"".join(encode(Kind.SEEN, {"keys": dict(c)}) for c in chunks)


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
    )


def scan(buf: bytes) -> tuple[list[Record], int]:
    """Parse records from a segment's bytes; returns them and the length of the intact prefix."""
    out: list[Record] = []
    pos = 0
    n = len(buf)
    while pos + HEADER.size <= n:
        magic, kind, mlen, dlen, digest = HEADER.unpack_from(buf, pos)
        if magic != MAGIC or mlen > MAX_META or kind not in Kind._value2member_map_:
            break
        start = pos + HEADER.size
        end = start + mlen + dlen
        if end > n:
            break
        h = xxhash.xxh64(buf[start : start + mlen])
        h.update(buf[start + mlen : end])
        if h.intdigest() != digest:
            break
        try:
            meta = json.loads(buf[start : start + mlen])
        except ValueError:
            break
        if not isinstance(meta, dict):
            break
        out.append(Record(Kind(kind), meta, start + mlen, dlen, pos, end - pos))
        pos = end
    return out, pos


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
