"""Lifeguard local health awareness.

A node that misses acks and nacks is more likely to be the slow one itself
(CPU starved, lossy NIC). It then stretches its own probe interval and timeout
by ``score + 1`` instead of suspecting healthy peers.
"""

from __future__ import annotations


class Awareness:
    """Health score in ``0 .. max_multiplier - 1``; 0 is healthy."""

    def __init__(self, max_multiplier: int) -> None:
        self.max_multiplier = max(1, max_multiplier)
        self.score = 0

    def apply_delta(self, delta: int) -> None:
        self.score = min(self.max_multiplier - 1, max(0, self.score + delta))

    def scale(self, timeout: float) -> float:
        return timeout * (self.score + 1)
