"""``mailq`` rows from the spool (pure): what is queued where, and moves in flight."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from duravip.config.model import Config
from duravip.mail import router
from duravip.mail.router import DEFAULT, MMOVE, PENDING, MailqRow
from duravip.mail.spool_format import QueuedMessage

#: The mail service's counters (``duravip console`` stats, metrics), all present from the start.
COUNTERS = (
    "received",
    "delivered",
    "deferred",
    "bounced",
    "mmove_sent",
    "mmove_received",
    "mmove_dup",
    "mmove_auth_failed",
    "mmove_failed",
    # A sealed mmove frame failed (tampering on the path, or a broken peer).
    "mmove_frame_rejected",
    # Two-phase mmove: pending copies made live / dropped (by a commit or a resolution).
    "mmove_committed",
    "mmove_aborted",
    # Delivery: a copy delivered within the dedup window; a restart of a delivery cut off by a crash.
    "delivery_dup_suppressed",
    "delivery_in_doubt",
    # Found by the spool's recovery at open (see Spool.recovery).
    "spool_torn_tails",
    "spool_corrupt_regions",
)


def mailq_rows(
    messages: Iterable[QueuedMessage],
    route_of: Callable[[str], router.Route],
    config: Config,
    node_retry_at: Mapping[str, float],
    now: float | None = None,
) -> list[MailqRow]:
    """Sorted rows, always with ``default/#mmove``; ``default/#pending`` last when any
    moved copy awaits its sender's commit (``active``: how many, ``age``: the oldest)."""
    now = time.time() if now is None else now
    rows: dict[tuple[str, str], list[int]] = {}
    pending: list[float] = []
    for m in messages:
        if m.pending is not None:
            pending.append(m.received_at)
            continue
        kind, node = route_of(m.binding)
        if kind == "move":
            key = (DEFAULT, MMOVE)
            delayed = node_retry_at.get(node or "", 0.0) > now
        else:
            key = (router.group_of(config, m.binding), m.binding)
            delayed = kind == "wait" or (m.attempts > 0 and m.next_at > now)
        row = rows.setdefault(key, [0, 0])
        row[1 if delayed else 0] += 1
    rows.setdefault((DEFAULT, MMOVE), [0, 0])
    out = [MailqRow(g, b, a, d) for (g, b), (a, d) in sorted(rows.items())]
    if pending:
        out.append(MailqRow(DEFAULT, PENDING, len(pending), 0, age=max(0.0, now - min(pending))))
    return out
