"""Lifeguard dynamic suspicion timeout.

A suspicion starts at the maximum timeout and shrinks logarithmically with each
independent confirmation (another node suspecting the same incarnation), down
to the minimum once ``k`` confirmations arrived: a node that many members
cannot reach is declared dead fast, one that a single lossy prober suspects gets
the time it needs to refute.
"""

from __future__ import annotations

import math


def min_timeout(suspicion_mult: float, n: int, probe_interval: float) -> float:
    """``suspicion_mult * max(1, log10(n)) * probe_interval`` (floor 1 as memberlist)."""
    scale = max(1.0, math.log10(max(1, n)))
    return suspicion_mult * scale * probe_interval


class Suspicion:
    """The timer of one suspected node (one incarnation)."""

    __slots__ = ("confirmations", "incarnation", "k", "max_t", "min_t", "senders", "start")

    def __init__(
        self, *, incarnation: int, sender: str, k: int, min_t: float, max_t: float, start: float
    ) -> None:
        self.incarnation = incarnation
        self.k = max(0, k)
        self.min_t = min_t
        self.max_t = max(min_t, max_t)
        self.start = start
        self.senders = {sender}
        self.confirmations = 0

    def timeout(self) -> float:
        if self.k < 1:
            return self.min_t
        frac = math.log(self.confirmations + 1) / math.log(self.k + 1)
        return max(self.min_t, self.max_t - (self.max_t - self.min_t) * frac)

    @property
    def deadline(self) -> float:
        return self.start + self.timeout()

    def confirm(self, sender: str) -> bool:
        """Count an independent confirmation; True if it was new."""
        if sender in self.senders or self.confirmations >= self.k:
            return False
        self.senders.add(sender)
        self.confirmations += 1
        return True
