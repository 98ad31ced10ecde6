"""The takeover latency budget: one structured line per IP taken from a dead node."""

from __future__ import annotations

import logging
from ipaddress import IPv4Address

import pytest

from duravip.daemon.budget import STAGES, TakeoverBudget

IP = IPv4Address("10.0.0.2")


def test_one_line_with_every_stage_in_order_and_ms_from_dead(
    caplog: pytest.LogCaptureFixture,
) -> None:
    marks = {"n2": {"ack": 99.90, "suspect": 100.10, "dead": 100.20}}
    budget = TakeoverBudget(
        marks=lambda n: marks.get(n, {}),
        plumbed_at={IP: 100.205},
        garp_at={IP: 100.206},
        bound_at={IP: 100.203},
    )
    with caplog.at_level(logging.INFO, logger="duravip.budget"):
        budget.on_takeover(IP, "n2", 100.201)
    [rec] = [r for r in caplog.records if r.getMessage() == "takeover budget"]
    f = rec.fields  # type: ignore[attr-defined]
    assert f["ip"] == "10.0.0.2" and f["victim"] == "n2"
    stamps = [f[f"t_{k}"] for k in STAGES]
    assert stamps == sorted(stamps)  # the stages happen in the order they are listed
    assert f["dead_ms"] == 0.0 and f["suspect_ms"] == pytest.approx(-100.0)
    assert f["garp_ms"] == pytest.approx(6.0)
    assert budget.logged == 1


def test_a_left_holder_counts_its_leave_as_dead_and_missing_stamps_stay_none(
    caplog: pytest.LogCaptureFixture,
) -> None:
    budget = TakeoverBudget(marks=lambda n: {"left": 5.0}, plumbed_at={}, garp_at={}, bound_at={})
    with caplog.at_level(logging.INFO, logger="duravip.budget"):
        budget.on_takeover(IP, "n1", 5.01)
    [rec] = [r for r in caplog.records if r.getMessage() == "takeover budget"]
    f = rec.fields  # type: ignore[attr-defined]
    assert f["t_dead"] == 5.0 and f["t_last_ack"] is None and "plumbed_ms" not in f
    assert f["decision_ms"] == pytest.approx(10.0)
