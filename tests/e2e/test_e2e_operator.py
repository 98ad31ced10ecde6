"""End to end: operator control in the netns lab, through the console and config only.

Health checks (``link``, ``smtp``) demote a holder that is up but useless,
``node drain --wait`` hands everything over without a failed probe or a lost
message, ``preempt = false`` keeps a revived preferred node from taking its
IP back, and the notify hook sees every transition in order. One lab serves
the module; each test leaves it converged on the preferred nodes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from duravip_lab.config import with_operator
from duravip_lab.scenario import (
    PREFERRED,
    VIPS,
    HolderSampler,
    Prober,
    print_log_tails,
    send_mail,
    wait_converged,
    wait_delivered,
)

pytestmark = pytest.mark.lab

LINK = 'Health_Check "link" { rise = 2 interval = 0.2 }'
SMTP_INTERVAL, SMTP_FALL = 0.5, 3
SMTP = f'Health_Check "smtp" {{ rise = 2 fall = {SMTP_FALL} interval = {SMTP_INTERVAL} timeout = 0.3 }}'
DROP_TABLE = "dvop_smtp"
NOTIFY = """#!/bin/sh
echo "$*" >> "{dir}/events-$DURAVIP_NODE.log"
"""


def configure(lab: Any, **kw: Any) -> None:
    """Every node's config: the lab's own plus health checks, notify and ``kw``."""
    hook = lab.state_dir / "notify.sh"
    for n in lab.nodes:
        base = lab.state_dir / n / "base.conf"
        if not base.exists():
            base.write_text(lab.config_path(n).read_text())
        text = with_operator(base.read_text(), health=[LINK, SMTP], notify=hook, **kw)
        lab.config_path(n).write_text(text)


def reload_all(lab: Any) -> None:
    for n in lab.nodes:
        p = lab.console(n, "config", "reload")
        assert p.returncode == 0, p.stderr


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    if os.geteuid() != 0:
        pytest.skip("lab tests need root")
    import duravip_lab

    lab = duravip_lab.Lab(f"op{os.getpid() % 1000:03d}")
    try:
        lab.up(nodes=3, vips=3, profile="fast")
        hook = lab.state_dir / "notify.sh"
        hook.write_text(NOTIFY.format(dir=lab.state_dir))
        hook.chmod(0o755)
        configure(lab)
        check = lab.exec("n1", [sys.executable, "-m", "duravip", "check-config", str(lab.config_path("n1"))])
        assert check.returncode == 0, check.stdout + check.stderr
        lab.start()
        wait_converged(lab, VIPS, timeout=30, expect=PREFERRED)
        yield lab
    finally:
        print_log_tails(lab)
        lab.down()


@pytest.fixture
def healthy(lab: Any) -> Iterator[Any]:
    """Restore the lab after each test: no faults, default config, undrained, VIPs preferred."""
    yield lab
    lab.heal()
    for n in lab.nodes:
        lab.nft(n, f"add table inet {DROP_TABLE}\ndelete table inet {DROP_TABLE}")
        lab.carrier(n, up=True)
        if not lab.running(n):
            lab.revive(n)
    configure(lab)
    time.sleep(0.5)
    reload_all(lab)
    for n in lab.nodes:
        lab.console(n, "node", "undrain")
    wait_converged(lab, VIPS, timeout=30, expect=PREFERRED)


def events(lab: Any, node: str) -> list[str]:
    path: Path = lab.state_dir / f"events-{node}.log"
    return path.read_text().splitlines() if path.exists() else []


def mark_events(lab: Any) -> dict[str, int]:
    return {n: len(events(lab, n)) for n in lab.nodes}


def events_since(lab: Any, node: str, mark: dict[str, int]) -> list[str]:
    return events(lab, node)[mark[node]:]


def status(lab: Any, node: str) -> dict[str, Any]:
    p = lab.console(node, "--json", "node", "status")
    assert p.returncode == 0, p.stderr
    data: dict[str, Any] = json.loads(p.stdout)
    return data


def show(lab: Any, node: str) -> dict[str, Any]:
    p = lab.console(node, "--json", "cluster", "duravip", "show")
    assert p.returncode == 0, p.stderr
    return {d["ip"]: d for d in json.loads(p.stdout)["duravips"]}


def wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise TimeoutError(what)


def test_link_carrier_loss_moves_the_holders_ips_within_a_second(healthy: Any) -> None:
    lab = healthy
    prober = Prober(lab, "10.1.1.1", seconds=3.0, interval=0.02).start()
    time.sleep(0.3)
    fault = time.time()
    lab.carrier("n1", up=False)  # n1's process runs on; its eth1 shows NO-CARRIER
    prober.join()
    ms = prober.failover_ms(fault)
    print(f"link carrier loss -> another node answers on 10.1.1.1 after {ms} ms")
    assert ms is not None and ms < 1000, prober.records[-5:]
    # n1 let go of its own IPs (it cannot serve them) and took none of the others'.
    wait_for(lambda: lab.holds("n1") == [], 2, f"n1 still holds {lab.holds('n1')}")
    st = status(lab, "n1")
    assert not st["eligible"] and st["reason"].startswith("unhealthy: link"), st
    assert {h["check"]: h["status"] for h in st["health"]}["link"] == "unhealthy"
    lab.carrier("n1", up=True)
    wait_converged(lab, VIPS, timeout=20, expect=PREFERRED)
    assert status(lab, "n1")["eligible"]


def test_smtp_listener_unreachable_moves_ips_then_they_come_back(healthy: Any) -> None:
    lab = healthy
    mark = mark_events(lab)
    prober = Prober(lab, "10.1.1.1", seconds=6.0, interval=0.05).start()
    time.sleep(0.3)
    fault = time.time()
    # The process and its sockets stay; nothing reaches its SMTP port any more.
    lab.nft("n1", "\n".join([
        f"table inet {DROP_TABLE} {{",
        "  chain input {",
        "    type filter hook input priority -300; policy accept;",
        "    tcp dport 25 drop",
        "  }",
        "}",
    ]))  # fmt: skip
    prober.join()
    ms = prober.failover_ms(fault)
    bound = (SMTP_FALL * SMTP_INTERVAL + 1.0) * 1000
    print(f"SMTP unreachable on n1 -> 10.1.1.1 answers from another node after {ms} ms (bound {bound})")
    assert ms is not None and ms < bound, prober.records[-5:]
    st = status(lab, "n1")
    assert st["reason"].startswith("unhealthy: smtp"), st
    table = show(lab, "n2")
    assert "n1 unhealthy: smtp" in table["10.1.1.1"]["reason"], table["10.1.1.1"]
    new = table["10.1.1.1"]["owner"]
    assert new in ("n2", "n3")
    lab.nft("n1", f"add table inet {DROP_TABLE}\ndelete table inet {DROP_TABLE}")
    wait_converged(lab, VIPS, timeout=20, expect=PREFERRED)
    # The notify hook saw the failover and the fail-back in order, on both sides.
    wait_for(lambda: "acquire 10.1.2.1" in events_since(lab, "n1", mark), 5, "n1 fail-back events")
    assert events_since(lab, "n1", mark) == [
        "unhealthy",
        "release 10.1.1.1",
        "release 10.1.2.1",
        "healthy",
        "acquire 10.1.1.1",
        "acquire 10.1.2.1",
    ]
    wait_for(lambda: "release 10.1.2.1" in events_since(lab, new, mark), 5, f"{new} release events")
    assert events_since(lab, new, mark) == [
        "acquire 10.1.1.1",
        "acquire 10.1.2.1",
        "release 10.1.1.1",
        "release 10.1.2.1",
    ]
    metrics = lab.console("n1", "metrics").stdout
    assert 'duravip_health_total{check="smtp",counter="transitions"}' in metrics
    assert 'duravip_notify_total{counter="failed"} 0' in metrics


def test_drain_wait_hands_over_ips_and_queue_without_a_failed_probe(healthy: Any) -> None:
    lab = healthy
    lab.pause("sink")  # mail queues on n1 for binding duravip-1
    try:
        ids = send_mail(lab, "10.1.1.1", subject="drain", headers={"X-Binding": "duravip-1"}, count=5)
        with HolderSampler(lab) as sampler:
            # A real client retransmits a SYN after 1 s: a probe may wait that long.
            prober = Prober(lab, "10.1.1.1", seconds=4.0, interval=0.05, timeout=1.5).start()
            t0 = time.monotonic()
            p = lab.console("n1", "--json", "node", "drain", "--wait")
            took = time.monotonic() - t0
            prober.join()
        assert p.returncode == 0, p.stderr
        reply = json.loads(p.stdout)
        assert reply["done"] and reply["held"] == 0 and reply["to_move"] == 0, reply
        print(f"node drain --wait: {took:.2f}s; {len(prober.records)} probes, {prober.failed()} failed")
        failed = [(r["t"], r["error"], r["ms"]) for r in prober.records if not r["ok"]]
        # No probe fails: no black hole (a SYN lost between the old holder's unplumb and
        # the new one's GARP is retransmitted after 1 s, to the new holder) and no reset
        # (the old holder drains with its socket still accepting and closes it only
        # after the unplumb; the new one binds with IP_FREEBIND before it plumbs).
        assert failed == [], failed
        assert sampler.double_holder_samples() == []
        assert lab.holds("n1") == []
        table = show(lab, "n3")
        assert "n1 drained" in table["10.1.1.1"]["reason"]
        mailq = json.loads(lab.console("n1", "--json", "mailq").stdout)
        assert sum(r["active"] + r["delayed"] for r in mailq["queues"]) == 0, mailq
    finally:
        lab.resume("sink")
    seen = wait_delivered(lab, ids, timeout=30)
    time.sleep(1.0)
    seen = wait_delivered(lab, ids, timeout=1)
    assert all(len(seen[i]) == 1 for i in ids), seen  # 0 lost, none twice
    assert {r["peer_ip"] for i in ids for r in seen[i]} == {"10.1.1.1"}
    # Drained state survives a restart.
    assert lab.stop("n1")
    lab.start("n1")
    time.sleep(3.0)
    assert lab.holds("n1") == [] and status(lab, "n1")["drained"]
    p = lab.console("n1", "node", "undrain")
    assert p.returncode == 0, p.stderr
    wait_converged(lab, VIPS, timeout=20, expect=PREFERRED)


def test_preempt_false_a_revived_preferred_node_leaves_its_ip(healthy: Any) -> None:
    lab = healthy
    configure(lab, preempt=False)
    reload_all(lab)
    time.sleep(0.5)
    lab.crash("n2")
    held = wait_converged(lab, VIPS, timeout=10, nodes=["n1", "n3"])
    holder = held["10.1.1.2"]
    lab.revive("n2")
    time.sleep(4.0)  # well past n2's maturity
    held = wait_converged(lab, VIPS, timeout=5)
    assert held["10.1.1.2"] == holder, held
    row = show(lab, "n2")["10.1.1.2"]
    assert row["owner"] == holder and row["failback"] == "n2", row
    assert "does not preempt" in row["reason"]
    assert "10.1.1.2" in status(lab, "n2")["failback_pending"]
    # Until an operator moves it.
    p = lab.console("n2", "broadcast", "cluster", "duravip", "move", "10.1.1.2", "to", "n2")
    assert p.returncode == 0, p.stderr
    wait_converged(lab, VIPS, timeout=10, expect=PREFERRED)


def test_notify_sees_drain_failover_and_failback_in_order(healthy: Any) -> None:
    lab = healthy
    mark = mark_events(lab)
    p = lab.console("n3", "node", "drain", "--wait")
    assert p.returncode == 0, p.stderr
    taker = wait_converged(lab, VIPS, timeout=10)["10.1.1.3"]
    p = lab.console("n3", "node", "undrain")
    assert p.returncode == 0, p.stderr
    wait_converged(lab, VIPS, timeout=20, expect=PREFERRED)
    wait_for(lambda: "acquire 10.1.1.3" in events_since(lab, "n3", mark), 5, "n3 acquire event")
    assert events_since(lab, "n3", mark) == [
        "drained", "release 10.1.1.3", "undrained", "acquire 10.1.1.3",
    ]  # fmt: skip
    wait_for(lambda: "release 10.1.1.3" in events_since(lab, taker, mark), 5, "taker release")
    assert events_since(lab, taker, mark) == ["acquire 10.1.1.3", "release 10.1.1.3"]
