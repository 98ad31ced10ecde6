"""The short chaos run of CI: 3 nodes, 1.5 minutes, seed 1; no acknowledged mail lost.

It runs ``scripts/chaos`` as a subprocess, exactly as a person would, so a
regression anywhere on the mail or fail-over path that loses or duplicates an
acknowledged message, or leaves a VIP dark, fails the build.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600


@pytest.mark.lab
def test_short_chaos_run_loses_nothing(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("lab tests need root")
    svg = tmp_path / "chaos.svg"
    cmd = [sys.executable, str(REPO / "scripts" / "chaos"), "--nodes", "3", "--minutes", "1.5",
           "--seed", "1", "--json", "--svg", str(svg),
           "--keep-logs", str(tmp_path / "logs")]
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
        sys.path.insert(0, str(REPO / "netns-lab"))
        import duravip_lab

        leftover = duravip_lab.Lab(f"bc{proc.pid % 100}")
        if leftover.exists():
            leftover.down()
    assert out.strip(), f"no JSON on stdout; stderr:\n{err[-3000:]}"
    res = json.loads(out)
    summary = json.dumps({k: v for k, v in res.items() if k != "events"})
    assert res["sent"] > 0 and res["acked"] > 0, summary
    assert sum(res["faults"].values()) > 0, summary
    assert res["lost"] == 0, summary
    assert res["duplicated"] == 0, summary
    assert res["unanswered_vips"] == [], summary + err[-3000:]
    assert res["bad_holders_at_end"] == {}, summary
    assert proc.returncode == 0, summary
    assert svg.read_text().startswith("<svg")
