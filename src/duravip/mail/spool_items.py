"""What the spool's writers hand it: a new message, a record to append, a batch (no I/O).

Split from :mod:`~duravip.mail.spool` (which re-exports the public names) to keep
the group commit there readable.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

import trio
from attrs import Factory, define, frozen

__all__ = ["Batch", "Item", "NewMessage", "SpoolError", "new_queue_id"]


class SpoolError(Exception):
    """A durable write failed; the caller must not acknowledge the message."""


def new_queue_id() -> str:
    """Time-sortable (milliseconds), globally unique with high probability (40 random bits)."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(5)}"


@frozen
class NewMessage:
    """What ``Spool.store`` needs; the spool assigns the queue id."""

    mail_from: str
    rcpt_to: tuple[str, ...]
    data: bytes
    binding: str
    requested: str
    origin: str
    #: Original id of a moved message; ``None``: this is a new message (mmove id = queue id).
    mmove_id: str | None = None
    transfer_key: str | None = None
    attempts: int = 0
    next_at: float = 0.0
    #: Pre-allocated queue id (from :func:`new_queue_id`), e.g. to hash on before storing.
    queue_id: str | None = None
    pending: str | None = None  # two-phase mmove: the sender, until it commits


@define
class Item:
    data: bytes
    #: Length of the payload at the end of ``data`` (STORE), to locate it once placed.
    payload_len: int
    on_durable: Callable[[int, int], None]
    #: Set on compaction copies: the message being relocated.
    reloc: str | None = None


@define
class Batch:
    items: list[Item] = Factory(list)
    done: trio.Event = Factory(trio.Event)
    error: BaseException | None = None
    #: A writer has taken the lead of this batch.
    led: bool = False
    #: Where its bytes start, and the roll-back epoch it was written in.
    segment: int = 0
    start: int = 0
    epoch: int = 0
