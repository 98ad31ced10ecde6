"""End to end, IPv6: a dual-stack 3-node cluster in the netns lab (``family=6``).

IPv6 DuraVIPs are plumbed with NODAD and announced with unsolicited neighbour
advertisements; a crash moves them and the client (whose neighbour entry
points at the dead node's MAC) reaches the new holder; mail taken on an IPv6
listener leaves from the IPv6 binding exactly once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from duravip_lab.scenario import Prober, print_log_tails, send_mail, wait_converged, wait_delivered

pytestmark = pytest.mark.lab

V6 = {"2001:db8:1::1": "n1", "2001:db8:1::2": "n2", "2001:db8:1::3": "n3"}
#: Followers: a v6 listener following a v6 binding, a v6 one following a v4 binding,
#: a v4 one following a v6 binding (``Duravip_Follow`` across families).
FOLLOW = {"2001:db8:2::1": "n1", "2001:db8:2::4": "n1", "10.1.2.6": "n1", "10.1.2.1": "n1"}
V4 = {"10.1.1.1": "n1", "10.1.1.2": "n2", "10.1.1.3": "n3"}
PREFERRED = {**V4, **V6, **FOLLOW}
ALL = [*PREFERRED, "2001:db8:1::101", "2001:db8:1::102", "10.1.1.101", "10.1.1.102"]
FAILOVER_BOUND_MS = 5000


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    import os

    if os.geteuid() != 0:
        pytest.skip("lab tests need root")
    import duravip_lab

    lab = duravip_lab.Lab(f"s{os.getpid() % 1000:03d}")
    try:
        lab.up(nodes=3, vips=3, profile="fast", family=6)
        lab.start()
        wait_converged(lab, ALL, timeout=40, expect=PREFERRED)
        yield lab
    finally:
        print_log_tails(lab)
        lab.down()


def test_dual_stack_lab_and_console(lab: Any) -> None:
    assert lab.vip(1) == "2001:db8:1::1" and lab.vip(1, family=4) == "10.1.1.1"
    for ip, node in V6.items():
        recs = lab.probe(ip, seconds=2, interval=0.05, until_ok=True)
        assert any(r["ok"] and r["node"] == node for r in recs), recs[-3:]
    # IPv6 DuraVIPs are plumbed without DAD: never tentative
    out = lab.exec("n1", ["ip", "-6", "-o", "addr", "show", "dev", "eth1"], check=True).stdout
    line = next(x for x in out.splitlines() if "2001:db8:1::1/128" in x)
    assert "tentative" not in line and "nodad" in line, line
    p = lab.console("n1", "--json", "cluster", "duravip", "show")
    assert p.returncode == 0, p.stderr
    shown = {d["ip"]: d for d in json.loads(p.stdout)["duravips"]}
    assert shown["2001:db8:1::1"]["holders"] == ["n1"], shown["2001:db8:1::1"]
    assert "10.1.1.1" in shown and "2001:db8:2::4" in shown
    metrics = lab.exec(
        "client",
        [
            "python3",
            "-c",
            "import urllib.request as u;"
            "print(u.urlopen('http://10.1.0.11:9100/metrics', timeout=5).read().decode())",
        ],
        check=True,
    ).stdout
    held = [x for x in metrics.splitlines() if x.startswith("duravip_ips_held")]
    assert held and float(held[0].split()[-1]) == len(lab.holds("n1")) == 7, held  # both families


def test_crash_failover_of_an_ipv6_vip(lab: Any) -> None:
    ip = "2001:db8:1::2"
    # the client knows n2's MAC for the VIP (a neighbour entry), as a real client would
    assert lab.probe(ip, seconds=2, interval=0.05, until_ok=True)[-1]["node"] == "n2"
    prober = Prober(lab, ip, seconds=8, interval=0.02).start()
    time.sleep(1.0)
    fault_at = time.time()
    lab.crash("n2")
    recs = prober.join()
    ms = prober.failover_ms(fault_at)
    print(f"IPv6 crash failover: {ms} ms; longest gap {prober.longest_gap_ms():.0f} ms")
    assert ms is not None and ms < FAILOVER_BOUND_MS, recs[-5:]
    after = [r for r in recs if r["ok"] and r["ts"] > fault_at]
    assert after and after[-1]["node"] in ("n1", "n3")
    new = after[-1]["node"]
    holders = wait_converged(lab, [ip], timeout=10, nodes=["n1", "n3"])
    assert holders[ip] == new
    lab.revive("n2")
    wait_converged(lab, ALL, timeout=40, expect=PREFERRED)
    # Fail-back: the revived node answers on its IPv6 VIP (a node whose own IPv6
    # address was flushed by the carrier loss would hold the VIP but never reply).
    back = lab.probe(ip, seconds=3, interval=0.05, timeout=0.5, until_ok=True)
    assert back and back[-1]["ok"] and back[-1]["node"] == "n2", back[-5:]


def test_mail_on_ipv6_listener_leaves_from_ipv6_binding_once(lab: Any) -> None:
    ids = send_mail(
        lab,
        "2001:db8:1::3",
        subject="v6 exactly once",
        count=3,
        headers={"X-Binding": "duravip6-3"},
    )
    seen = wait_delivered(lab, ids, timeout=30)
    time.sleep(1.0)  # a duplicate would arrive right behind the first copy
    recs = [r for r in lab.sink_log() if r.get("message_id") in set(ids)]
    assert len(recs) == len(ids), recs
    for mid in ids:
        assert len(seen[mid]) == 1
        assert seen[mid][0]["peer_ip"] == "2001:db8:1::3", seen[mid]


def test_ipv4_listener_following_an_ipv6_binding(lab: Any) -> None:
    """Mail on 10.1.2.6 (follows duravip6-1) leaves from 2001:db8:1::1, over IPv6."""
    ids = send_mail(lab, "10.1.2.6", subject="v4 follows v6")
    seen = wait_delivered(lab, ids, timeout=30)
    assert seen[ids[0]][0]["peer_ip"] == "2001:db8:1::1", seen
