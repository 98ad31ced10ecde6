"""Announcement pacing: a burst keeps to its rate, and never starves the loop."""

from __future__ import annotations

import pytest
import trio

from duravip.plumbing.pacing import PACE_EVERY, Pacer


async def test_a_burst_keeps_to_the_rate(autojump_clock: trio.abc.Clock) -> None:
    start = trio.current_time()
    pacer = Pacer(rate=320.0)
    for _ in range(640):
        await pacer.sent()
    assert pacer.count == 640
    # 640 frames at 320/s: the last check (frame 640) waits until 2 s after the start.
    assert trio.current_time() - start == pytest.approx(2.0, abs=1e-6)


async def test_a_late_burst_only_checkpoints(autojump_clock: trio.abc.Clock) -> None:
    pacer = Pacer(rate=1.0)
    await trio.sleep(1000.0)  # far behind schedule: no sleep is owed
    before = trio.current_time()
    for _ in range(PACE_EVERY * 3):
        await pacer.sent()
    assert trio.current_time() == before
