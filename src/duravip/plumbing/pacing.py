"""Pacing of announcement bursts (gratuitous ARP, unsolicited NA).

One place for the rule both senders follow: at most ``rate`` frames a
second, checked every 32 frames so a burst of 10,240 costs few sleeps, and a
checkpoint when on time so a long burst never starves the event loop.
"""

from __future__ import annotations

import trio

#: Frames between two pacing checks.
PACE_EVERY = 32


class Pacer:
    """Call :meth:`sent` after each frame; it sleeps when the burst runs ahead of ``rate``."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.start = trio.current_time()
        self.count = 0

    async def sent(self) -> None:
        self.count += 1
        if self.count % PACE_EVERY:
            return
        ahead = self.start + self.count / self.rate - trio.current_time()
        if ahead > 0:
            await trio.sleep(ahead)
        else:
            await trio.lowlevel.checkpoint()
