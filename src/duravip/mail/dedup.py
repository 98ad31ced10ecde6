"""Delivery dedup window: a ``Message-ID`` (with its envelope) handed to the smarthost once.

When the smarthost answers ``250`` for a whole message, the spool's
``REMOVE`` record carries the message's dedup key (``msgid`` mark, see
``spool_format.MARKS``): the delete and the memory of the delivery are one
durable record, carried across segments by the ``SEEN`` checkpoints. Before
a message is sent, its key is looked up: a second copy delivered within
``dedup_window`` (from a client that resubmitted after a lost ``250``, or an
older node's duplicate) is dropped instead (``delivery_dup_suppressed``).

The key is the ``Message-ID`` plus a digest of the sender and the sorted
recipients, so one message split by recipients into several transactions
(the same ``Message-ID``) is not mistaken for a copy. Messages without a
``Message-ID`` are never suppressed. Bounded by age and by count
(``dedup_max``, oldest forgotten first).
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping

import xxhash
from attrs import define

from duravip.mail.spool_format import DELIVERED, QueuedMessage

#: Only this much of a message is scanned for the header.
SCAN_LIMIT = 64 * 1024
#: Pruning runs at most this often (it walks every remembered key).
PRUNE_EVERY = 60.0


def message_id(data: bytes) -> str | None:
    """The ``Message-ID`` header's value (first occurrence, unfolded), if any."""
    head = data[:SCAN_LIMIT]
    end = head.find(b"\r\n\r\n")
    lines = (head if end < 0 else head[:end]).split(b"\r\n")
    for i, line in enumerate(lines):
        if line[:11].lower() == b"message-id:":
            value = line[11:]
            for cont in lines[i + 1 :]:
                if cont[:1] not in (b" ", b"\t"):
                    break
                value += cont
            text = value.decode("utf-8", "replace").strip()
            return text[:998] or None
    return None


def dedup_key(msg: QueuedMessage, data: bytes) -> str | None:
    mid = message_id(data)
    if mid is None:
        return None
    env = "\0".join((msg.mail_from, *sorted(msg.rcpt_to))).encode()
    return f"{mid}|{xxhash.xxh64_hexdigest(env)}"


@define
class DedupWindow:
    window: float = 86400.0
    max_entries: int = 100_000
    _pruned_at: float = 0.0

    def recent(self, seen: MutableMapping[str, float], key: str | None, now: float | None = None) -> bool:
        """Whether ``key`` was delivered within the window."""
        if key is None or self.window <= 0:
            return False
        at = seen.get(DELIVERED + key)
        t = time.time() if now is None else now
        return at is not None and t - at <= self.window

    def prune(self, seen: MutableMapping[str, float], now: float | None = None) -> int:
        """Forget deliveries older than the window, then the oldest beyond ``max_entries``."""
        t = time.time() if now is None else now
        if t - self._pruned_at < PRUNE_EVERY:
            return 0
        self._pruned_at = t
        mine = sorted((at, k) for k, at in seen.items() if k.startswith(DELIVERED))
        cut = [k for at, k in mine if t - at > self.window]
        keep = len(mine) - len(cut)
        if keep > self.max_entries:
            cut += [k for _, k in mine[len(cut) : len(cut) + keep - self.max_entries]]
        for k in cut:
            del seen[k]
        return len(cut)
