"""The short chaos run of CI: 3 nodes, 1.5 minutes, seed 1; no acknowledged mail lost.

It runs ``scripts/chaos`` as a subprocess, exactly as a person would, so a
regression anywhere on the mail or fail-over path that loses or duplicates an
acknowledged message, or leaves a VIP dark, fails the build.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600


@pytest.mark.lab
def test_short_chaos_run_loses_nothing(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("lab tests need root")
    svg = tmp_path / "chaos.svg"
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "chaos"),
        "--nodes",
        "3",
        "--minutes",
        "1.5",
        "--seed",
        "1",
        "--json",
        "--svg",
        str(svg),
        "--keep-logs",
        str(tmp_path / "logs"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script tears its lab down on SIGTERM
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"chaos run overran {TIMEOUT_S} s:\n{err[-3000:]}")
    finally:
        import duravip_lab

        prefix = os.environ.get("CHAOS_LAB_PREFIX", "bc")  # the script's own default
        leftover = duravip_lab.Lab(f"{prefix}{proc.pid % 100}")
        if leftover.exists():
            leftover.down()
    assert out.strip(), f"no JSON on stdout; stderr:\n{err[-3000:]}"
    res = json.loads(out)
    summary = json.dumps({k: v for k, v in res.items() if k != "events"})
    assert res["sent"] > 0 and res["acked"] > 0, summary
    assert sum(res["faults"].values()) > 0, summary
    assert res["lost"] == 0, summary
    # Known gap (docs/mail.md, "Delivery exactly once", "What is left"): moves are
    # exactly once (two-phase mmove), and a release quiesces the IP's deliveries,
    # a stalled process gives a transaction up before its data, a late 250 is
    # nudged; but a takeover from a holder that is still alive (a partition
    # under quorum none, a false suspicion) can steal a 250 mid-reply, and a
    # kill between that 250 and the spool's record leaves the copy in doubt:
    # it is sent again (counted delivery_in_doubt). A handful is that gap; more
    # is a regression. The script itself still exits 1 on any duplicate.
    assert res["duplicated"] <= max(1, res["acked"] // 200), summary
    assert res["unanswered_vips"] == [], summary + err[-3000:]
    assert res["bad_holders_at_end"] == {}, summary
    assert proc.returncode == 0 or res["duplicated"] > 0, summary
    assert svg.read_text().startswith("<svg")


# --- the checker and the scheduler themselves, without a lab (fast, no root) ---------------------


def _load(name: str) -> Any:
    """Import an extensionless script of scripts/ as a module."""
    loader = importlib.machinery.SourceFileLoader(
        name.replace("-", "_"), str(REPO / "scripts" / name)
    )
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


class _FakeLab:
    """Records what the scheduler asks of a lab."""

    def __init__(self, n: int) -> None:
        self.nodes = [f"n{i}" for i in range(1, n + 1)]
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, verb: str) -> Any:
        def call(*args: Any, **kw: Any) -> Any:
            self.calls.append((verb, args))
            return subprocess.CompletedProcess([], 0, "", "")

        return call


def _schedule(seed: int, n: int = 5, steps: int = 60) -> tuple[list[tuple[str, str]], int]:
    chaos_mod = _load("chaos")
    lab = _FakeLab(n)
    c = chaos_mod.Chaos(lab, seed, 1e9)
    worst = 0
    vt = 0.0
    for _ in range(steps):
        vt += c.rng.uniform(1.5, 4.0)
        c.step(vt)
        worst = max(worst, len(c.down) + len(c.paused))
    return [(e["type"], e["what"]) for e in c.events], worst


def test_fault_schedule_is_a_function_of_the_seed_and_bounded() -> None:
    a, worst_a = _schedule(7)
    b, _ = _schedule(7)
    c, _ = _schedule(8)
    assert a == b
    assert a != c
    assert worst_a <= 2  # (5 - 1) // 2 nodes down or paused at most
    kinds = {k for k, _ in a}
    assert {"crash", "kill", "pause", "stop", "partition", "loss", "revive", "reload"} <= kinds


def test_checker_counts_lost_duplicated_and_misrouted() -> None:
    chaos_mod = _load("chaos")
    sent = [
        {"mid": "<a>", "ok": True},
        {"mid": "<b>", "ok": True},
        {"mid": "<c>", "ok": True},
        {"mid": "<d>", "ok": False},
        {"mid": "<e>", "ok": True},
    ]
    expected = {m["mid"]: {"10.1.1.1"} for m in sent}
    sink = [
        {"message_id": "<a>", "peer_ip": "10.1.1.1"},
        {"message_id": "<b>", "peer_ip": "10.1.1.1"},
        {"message_id": "<b>", "peer_ip": "10.1.1.1"},
        {"message_id": "<d>", "peer_ip": "10.1.1.1"},
        {"message_id": "<e>", "peer_ip": "10.1.0.11"},
    ]
    r = chaos_mod.check(sent, expected, sink)
    assert (r["sent"], r["acked"], r["delivered"]) == (5, 4, 3)
    assert (r["duplicated"], r["lost"], r["misrouted"]) == (1, 1, 1)
    assert r["lost_ids"] == ["<c>"] and r["unacked_delivered"] == 1


def test_outages_and_percentiles() -> None:
    from duravip_lab import bench

    recs = [{"ok": ok, "ts": t} for t, ok in [(0, 1), (1, 0), (2, 0), (3, 1), (4, 0)]]
    assert bench.outages(recs) == [(1.0, 2000.0), (4.0, 0.0)]
    assert bench.percentile([5, 1, 3, 2, 4], 50) == 3
    assert bench.summary([]) == {"p50_ms": None, "p90_ms": None, "max_ms": None}
    assert bench.summary([10.0] * 9 + [100.0])["p90_ms"] == 10.0
