"""``quorum = "majority"`` in the lab: the minority side of a partition serves nothing."""

from __future__ import annotations

import time
from typing import Any

import pytest
from duravip_lab.scenario import PREFERRED, VIPS, holders, wait_converged

pytestmark = pytest.mark.lab



def test_majority_quorum_minority_releases_and_heal_restores(lab_factory: Any) -> None:
    lab = lab_factory(nodes=3, vips=3, profile="fast", quorum="majority")
    lab.start()
    wait_converged(lab, VIPS, timeout=30, expect=PREFERRED)
    time.sleep(1.5)  # let the 3-node membership become the "last stable" one

    lab.partition(["n1"], ["n2", "n3"])
    # n1 sees 1 of 3: it must drop everything; n2 and n3 (2 of 3) take n1's IPs.
    held = wait_converged(lab, VIPS, timeout=15, nodes=["n2", "n3"])
    deadline = time.monotonic() + 10
    while lab.holds("n1") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lab.holds("n1") == []
    assert held["10.1.1.1"] in ("n2", "n3")
    assert all(len(h) == 1 for h in holders(lab).values())

    lab.heal()
    wait_converged(lab, VIPS, timeout=20, expect=PREFERRED)
