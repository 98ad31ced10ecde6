"""The hysteresis / hold-down state machine, driven directly with ``now`` (hypothesis)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from duravip.health.state import Hysteresis

params = st.fixed_dictionaries(
    {
        "rise": st.integers(1, 4),
        "fall": st.integers(1, 4),
        "flap_limit": st.integers(1, 6),
        "hold_down": st.floats(0.5, 30.0),
    }
)
#: (seconds since the previous probe, probe ok?)
runs = st.lists(st.tuples(st.floats(0.01, 5.0), st.booleans()), max_size=120)


def drive(h: Hysteresis, steps: list[tuple[float, bool]]) -> list[tuple[float, bool, bool, bool]]:
    """Feed ``steps``; returns (now, ok, passing before, passing after) per probe."""
    now, out = 0.0, []
    for dt, ok in steps:
        now += dt
        before = h.passing
        h.observe(now, ok)
        out.append((now, ok, before, h.passing))
    return out


@settings(max_examples=300, deadline=None)
@given(params, runs)
def test_a_verdict_changes_only_after_rise_or_fall_agreeing_probes(p: dict, steps: list) -> None:
    h = Hysteresis(**p)
    trace = drive(h, steps)
    for i, (_, ok, before, after) in enumerate(trace):
        if before == after:
            continue
        if i == 0:  # the first result decides at once
            assert not ok and not after
            continue
        need = p["rise"] if after else p["fall"]
        window = [t[1] for t in trace[max(0, i - need + 1) : i + 1]]
        assert len(window) == need and all(w == after for w in window), (i, trace)
        assert ok == after


@settings(max_examples=300, deadline=None)
@given(params, runs)
def test_hold_down_bounds_what_the_election_sees(p: dict, steps: list) -> None:
    """The obeyed verdict (``healthy``) changes at most ``2 * flap_limit`` times in any
    ``hold_down`` window: a flapping check is reported, not followed endlessly."""
    h = Hysteresis(**p)
    now, seen, changes = 0.0, h.healthy(0.0), []
    for dt, ok in steps:
        # Look at the verdict just before the probe too (a hold-down may have ended).
        now += dt
        mid = h.healthy(now)
        if mid != seen:
            changes.append(now)
            seen = mid
        h.observe(now, ok)
        after = h.healthy(now)
        if after != seen:
            changes.append(now)
            seen = after
        if h.status(now) == "flapping":
            assert not h.healthy(now) and h.deadline(now) == h.held_until > now
    for i, t in enumerate(changes):
        inside = [c for c in changes[i:] if c < t + p["hold_down"]]
        assert len(inside) <= 2 * p["flap_limit"] + 1, changes


@settings(max_examples=200, deadline=None)
@given(params, st.integers(1, 50))
def test_steady_results_settle_and_never_flap(p: dict, n: int) -> None:
    h = Hysteresis(**p)
    drive(h, [(1.0, True)] + [(1.0, False)] * n)
    assert h.passing == (n < p["fall"])
    assert h.hold_downs == (1 if p["flap_limit"] == 1 and n >= p["fall"] else 0)


def test_the_first_result_decides_at_once() -> None:
    h = Hysteresis(rise=2, fall=3, flap_limit=6, hold_down=60.0)
    assert h.healthy(0.0)  # nothing known yet
    assert h.observe(0.5, False) and not h.passing and h.transitions == 0
    assert not h.observe(1.5, True) and h.observe(2.5, True)


def test_flapping_is_held_down_then_released() -> None:
    h = Hysteresis(rise=1, fall=1, flap_limit=3, hold_down=10.0)
    h.observe(0.5, True)
    assert h.observe(1.0, False)  # change 1: unhealthy
    assert h.observe(2.0, True)  # change 2: healthy
    assert h.observe(3.0, False)  # change 3: flapping from now on
    assert h.status(3.0) == "flapping" and h.hold_downs == 1
    assert not h.observe(4.0, True)  # passing again, but held down
    assert h.passing and not h.healthy(4.0)
    assert h.deadline(4.0) == 13.0
    assert h.tick(12.9, 13.0) and h.healthy(13.0) and h.status(13.0) == "healthy"
    assert h.deadline(13.0) == math.inf


def test_failure_counters() -> None:
    h = Hysteresis(rise=2, fall=2, flap_limit=5, hold_down=60.0)
    for t, ok in enumerate([True, False, True, False, False, True, True]):
        h.observe(float(t), ok, "detail")
    assert (h.probes, h.failures, h.transitions) == (7, 3, 2)
    assert h.healthy(6.0) and h.detail == "detail"


@pytest.mark.parametrize("bad", [{"rise": 0}, {"fall": 0}, {"flap_limit": 0}, {"hold_down": 0.0}])
def test_rejects_nonsense(bad: dict) -> None:
    kw = {"rise": 2, "fall": 3, "flap_limit": 6, "hold_down": 60.0} | bad
    with pytest.raises(ValueError):
        Hysteresis(**kw)


def test_the_state_machine_is_sans_io() -> None:
    """Importing it pulls in no event loop (the runner is the only Trio part)."""
    import subprocess
    import sys

    code = "import sys, duravip.health.state; sys.exit('trio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
