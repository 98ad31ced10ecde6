"""One health check's verdict over time, sans-IO: rise/fall hysteresis and hold-down.

A single failed probe must not move IPs (a busy disk, one slow banner), and
a check that keeps changing its mind must not move them back and forth
forever. So: ``fall`` consecutive failures make a healthy check unhealthy,
``rise`` consecutive successes make it healthy again, and ``flap_limit``
verdict changes within ``hold_down`` seconds hold it *unhealthy* for
``hold_down`` seconds (reported as ``flapping``; the node stays out of the
elections instead of following every flip, like Pacemaker's failure
threshold). The very first result decides at once (a node that boots
broken must not take IPs for ``fall`` intervals first). Every call takes
``now``, so tests drive it without a clock.
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["Hysteresis"]


class Hysteresis:
    """The verdict of one check; feed it probe results with :meth:`observe`."""

    def __init__(self, *, rise: int, fall: int, flap_limit: int, hold_down: float) -> None:
        if rise < 1 or fall < 1 or flap_limit < 1 or hold_down <= 0:
            raise ValueError("rise, fall and flap_limit must be >= 1, hold_down > 0")
        self.rise = rise
        self.fall = fall
        self.flap_limit = flap_limit
        self.hold_down = hold_down
        #: The hysteresis verdict (healthy until the first result: a slow first
        #: probe does not hold a booting node out).
        self.passing = True
        self.ok_run = 0
        self.fail_run = 0
        #: End of the current hold-down (``-inf``: none).
        self.held_until = -math.inf
        self._changes: deque[float] = deque()
        self.probes = 0
        self.failures = 0
        self.transitions = 0
        self.hold_downs = 0
        self.detail = ""

    def healthy(self, now: float) -> bool:
        """What the election obeys: passing and not held down."""
        return self.passing and now >= self.held_until

    def status(self, now: float) -> str:
        if now < self.held_until:
            return "flapping"
        return "healthy" if self.passing else "unhealthy"

    def deadline(self, now: float) -> float:
        """When the verdict may change without a probe (hold-down end), else ``inf``."""
        return self.held_until if self.held_until > now else math.inf

    def observe(self, now: float, ok: bool, detail: str = "") -> bool:
        """One probe result at ``now``; True when :meth:`healthy` changed."""
        before = self.healthy(now)
        self.probes += 1
        self.detail = detail
        if ok:
            self.ok_run, self.fail_run = self.ok_run + 1, 0
        else:
            self.failures += 1
            self.ok_run, self.fail_run = 0, self.fail_run + 1
        if self.probes == 1 and not ok:
            self.passing = False  # the first result: no known-good state to keep
        elif self.passing and self.fail_run >= self.fall:
            self._flip(now, False)
        elif not self.passing and self.ok_run >= self.rise:
            self._flip(now, True)
        return self.healthy(now) != before

    def tick(self, before: float, now: float) -> bool:
        """Time passed from ``before`` to ``now`` with no probe; True when :meth:`healthy` changed."""
        return self.healthy(before) != self.healthy(now)

    def _flip(self, now: float, passing: bool) -> None:
        self.passing = passing
        self.transitions += 1
        changes = self._changes
        changes.append(now)
        while changes and changes[0] <= now - self.hold_down:
            changes.popleft()
        if len(changes) >= self.flap_limit and now >= self.held_until:
            self.held_until = now + self.hold_down
            self.hold_downs += 1
            changes.clear()
