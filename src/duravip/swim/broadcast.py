"""Retransmit-limited broadcast queue (piggybacked dissemination).

Each update is sent ``retransmit_mult * ceil(log10(n + 1))`` times, which is
enough for an epidemic to reach every node with high probability while the
per-node cost stays logarithmic. The least-sent (then newest) updates go
first, and a newer update about a node replaces the older one.
"""

from __future__ import annotations

import math

from attrs import define


def retransmit_limit(mult: int, n: int) -> int:
    """How many times one update is sent in a cluster of ``n`` members."""
    return max(1, mult * math.ceil(math.log10(n + 1)))


@define
class _Item:
    key: str
    payload: bytes
    order: int
    transmits: int = 0


class BroadcastQueue:
    """Updates waiting to be piggybacked, keyed by the node they are about."""

    def __init__(self) -> None:
        self._items: dict[str, _Item] = {}
        self._order = 0

    def __len__(self) -> int:
        return len(self._items)

    def queue(self, key: str, payload: bytes, sent: int = 0) -> None:
        """Add an update; it invalidates any pending update with the same key.

        ``sent`` pre-counts transmits, for updates worth only a few copies.
        """
        self._order += 1
        self._items[key] = _Item(key, payload, self._order, sent)

    def refresh(self, key: str, payload: bytes) -> bool:
        """Swap the payload of a pending update, keeping its transmit count; False if none."""
        item = self._items.get(key)
        if item is None:
            return False
        item.payload = payload
        return True

    def pending(self, key: str) -> bytes | None:
        item = self._items.get(key)
        return None if item is None else item.payload

    def clear(self) -> None:
        self._items.clear()

    def peek(self, budget: int, max_parts: int = 250) -> list[bytes]:
        """Like :meth:`get` but without counting a transmit (for sends that may be wasted)."""
        out: list[bytes] = []
        for item in sorted(self._items.values(), key=lambda i: (i.transmits, -i.order)):
            if len(item.payload) <= budget and len(out) < max_parts:
                out.append(item.payload)
                budget -= len(item.payload)
        return out

    def get(self, budget: int, limit: int, max_parts: int = 250) -> list[bytes]:
        """Pop as many updates as fit in ``budget`` bytes, counting one transmit each."""
        if not self._items or budget <= 0:
            return []
        out: list[bytes] = []
        items = sorted(self._items.values(), key=lambda i: (i.transmits, -i.order))
        for item in items:
            size = len(item.payload)
            if size > budget:
                continue
            out.append(item.payload)
            budget -= size
            item.transmits += 1
            if item.transmits >= limit:
                del self._items[item.key]
            if len(out) >= max_parts or budget < 16:
                break
        return out
