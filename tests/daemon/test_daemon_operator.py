"""Drain, health checks, preemption and notify hooks through the console (two in-process nodes)."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from .inproc import FOLLOW, VIP1, VIP2, Cluster, cluster

__all__ = ["cluster"]  # the fixture, imported for pytest


def configure(cluster: Cluster, name: str, *, in_cluster: str = "", extra: str = "") -> None:
    """Add keys to ``name``'s cluster block and stanzas at the end of its file."""
    path = cluster.paths[name]
    text = path.read_text().replace(
        "view_mature_time = 0.3\n", f"view_mature_time = 0.3\n{in_cluster}\n", 1
    )
    path.write_text(text + extra)


async def rows(cluster: Cluster, node: str) -> dict[str, dict[str, object]]:
    show = await cluster.console(node, "cluster", "duravip", "show")
    assert show["ok"], show
    return {d["ip"]: d for d in show["data"]["duravips"]}  # type: ignore[index]


async def until(pred, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not await pred():
            await trio.sleep(0.02)


async def test_drain_moves_everything_survives_restart_and_undrain_brings_it_back(
    cluster: Cluster,
) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(cluster.run, "n1")
            await nursery.start(cluster.run, "n2")
            await cluster.wait_holders({VIP1: "n1", VIP2: "n2", FOLLOW: "n1"})
            reply = await cluster.console("n1", "node", "drain", "--wait")
            assert reply["ok"], reply
            assert reply["data"]["done"] and reply["data"]["held"] == 0  # type: ignore[index]
            assert cluster.plumbers["n1"].addresses == {}
            # Peers announce a claim just before plumbing it: a moment later it is there.
            await cluster.wait_holders({VIP1: "n2", VIP2: "n2", FOLLOW: "n2"}, timeout=1)
            assert (cluster.tmp / "n1" / "spool" / "drained").exists()

            async def reason_says_drained() -> bool:
                r = await rows(cluster, "n2")
                return "n1 drained" in str(r[str(VIP1)]["reason"])

            await until(reason_says_drained)
            status = await cluster.console("n1", "node", "status")
            assert status["data"]["drained"] and status["data"]["reason"] == "drained"  # type: ignore[index]
            # Still a member.
            members = await cluster.console("n2", "cluster", "membership")
            states = {m["name"]: m["state"] for m in members["data"]["members"]}  # type: ignore[index]
            assert states["n1"] == "alive"
            status_of = {m["name"]: m["status"] for m in members["data"]["members"]}  # type: ignore[index]
            assert status_of == {"n1": "drained", "n2": None}

            # Restart n1: the drain holds, it takes nothing.
            cluster.scopes["n1"].cancel()
            await trio.sleep(0.5)
            await nursery.start(cluster.run, "n1")
            await trio.sleep(1.5)
            assert cluster.plumbers["n1"].addresses == {}
            status = await cluster.console("n1", "node", "status")
            assert status["data"]["drained"], status  # type: ignore[index]

            reply = await cluster.console("n1", "node", "undrain")
            assert reply["ok"], reply
            await cluster.wait_holders({VIP1: "n1", VIP2: "n2", FOLLOW: "n1"})
            assert not (cluster.tmp / "n1" / "spool" / "drained").exists()
            metrics = str((await cluster.console("n1", "metrics"))["data"]["prometheus"])  # type: ignore[index]
            assert "duravip_node_drained 0.0" in metrics and "duravip_node_eligible 1.0" in metrics
            nursery.cancel_scope.cancel()


async def test_link_carrier_loss_demotes_the_node_and_its_return_promotes_it(
    cluster: Cluster,
) -> None:
    for n in ("n1", "n2"):
        configure(cluster, n, extra='Health_Check "link" { rise = 2 interval = 0.2 }\n')
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(cluster.run, "n1")
            await nursery.start(cluster.run, "n2")
            await cluster.wait_holders({VIP1: "n1", VIP2: "n2", FOLLOW: "n1"})
            cluster.plumbers["n1"].set_carrier("lo", False)
            await cluster.wait_holders({VIP1: "n2", VIP2: "n2", FOLLOW: "n2"}, timeout=3)
            status = await cluster.console("n1", "node", "status")
            data = status["data"]
            assert data["reason"].startswith("unhealthy: link (no carrier on lo")  # type: ignore[index]

            async def reason_says_unhealthy() -> bool:
                r = await rows(cluster, "n2")
                return "n1 unhealthy: link" in str(r[str(VIP1)]["reason"])

            await until(reason_says_unhealthy)
            cluster.plumbers["n1"].set_carrier("lo", True)
            await cluster.wait_holders({VIP1: "n1", VIP2: "n2", FOLLOW: "n1"})
            metrics = str((await cluster.console("n1", "metrics"))["data"]["prometheus"])  # type: ignore[index]
            assert 'duravip_health_check_healthy{check="link"} 1.0' in metrics
            assert 'duravip_health_total{check="link",counter="transitions"} 2.0' in metrics
            nursery.cancel_scope.cancel()


async def test_script_check_and_notify_hook_see_a_failover_and_failback_in_order(
    cluster: Cluster,
) -> None:
    flag = cluster.tmp / "n1-ok"
    flag.touch()
    check = cluster.tmp / "check.sh"
    check.write_text(f"#!/bin/sh\ntest -e {flag}\n")
    log = cluster.tmp / "events.log"
    hook = cluster.tmp / "notify.sh"
    hook.write_text(f'#!/bin/sh\necho "$DURAVIP_NODE $*" >> {log}\n')
    for p in (check, hook):
        p.chmod(0o755)
    configure(
        cluster,
        "n1",
        in_cluster=f'  notify = "{hook}"',
        extra=f'Health_Check "probe" {{ type = script path = "{check}" rise = 2 fall = 2 interval = 0.1 }}\n',
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(cluster.run, "n1")
            await nursery.start(cluster.run, "n2")
            await cluster.wait_holders({VIP1: "n1", VIP2: "n2", FOLLOW: "n1"})
            flag.unlink()
            await cluster.wait_holders({VIP1: "n2", VIP2: "n2", FOLLOW: "n2"}, timeout=5)
            flag.touch()
            await cluster.wait_holders({VIP1: "n1", VIP2: "n2", FOLLOW: "n1"}, timeout=5)

            def events() -> list[str]:
                return log.read_text().splitlines() if log.exists() else []

            def tail() -> list[str]:
                # At start n1 may briefly hold VIP2 (before n2 matures): look from "unhealthy".
                ev = events()
                return ev[ev.index("n1 unhealthy"):] if "n1 unhealthy" in ev else []

            with trio.fail_after(5):
                while len(tail()) < 6:  # the hook runs one event at a time: wait for all
                    await trio.sleep(0.02)
            ev, start = tail(), 0
            assert ev[start:] == [
                "n1 unhealthy",
                "n1 release 127.0.1.1",
                "n1 release 127.0.2.1",
                "n1 healthy",
                "n1 acquire 127.0.1.1",
                "n1 acquire 127.0.2.1",
            ], ev
            status = await cluster.console("n1", "node", "status")
            assert status["data"]["notify"]["failed"] == 0  # type: ignore[index]
            nursery.cancel_scope.cancel()


async def test_preempt_false_leaves_the_ip_with_its_holder_until_a_move(cluster: Cluster) -> None:
    for n in ("n1", "n2"):
        configure(cluster, n, in_cluster="  preempt = false")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(cluster.run, "n1")
            await nursery.start(cluster.run, "n2")
            await cluster.wait_holders({VIP1: "n1", VIP2: "n2", FOLLOW: "n1"})
            assert (await cluster.console("n1", "shutdown"))["ok"]
            await cluster.wait_holders({VIP1: "n2", VIP2: "n2", FOLLOW: "n2"})
            await trio.sleep(0.3)
            await nursery.start(cluster.run, "n1")
            await trio.sleep(2.0)  # n1 is mature and a candidate by now
            assert cluster.holders() == {VIP1: ["n2"], VIP2: ["n2"], FOLLOW: ["n2"]}
            r = await rows(cluster, "n1")
            assert r[str(VIP1)]["owner"] == "n2"
            assert r[str(VIP1)]["failback"] == "n1", r[str(VIP1)]
            assert "does not preempt" in str(r[str(VIP1)]["reason"])
            status = await cluster.console("n1", "node", "status")
            assert str(VIP1) in status["data"]["failback_pending"]  # type: ignore[index]
            # An operator move brings it back.
            reply = await cluster.console("n1", "broadcast", "cluster", "duravip", "move", str(VIP1), "to", "n1")
            assert reply["ok"], reply
            await cluster.wait_holders({VIP1: "n1", VIP2: "n2", FOLLOW: "n1"})
            nursery.cancel_scope.cancel()


async def test_preempt_delay_fails_back_after_the_delay(cluster: Cluster) -> None:
    for n in ("n1", "n2"):
        configure(cluster, n, in_cluster="  preempt_delay = 1.5")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(cluster.run, "n2")
            await cluster.wait_holders({VIP1: "n2", VIP2: "n2"}, timeout=15)
            await nursery.start(cluster.run, "n1")
            await trio.sleep(1.2)  # n1 matured (0.3 s + sync) but its delay runs
            assert cluster.holders()[VIP1] == ["n2"]
            r = await rows(cluster, "n1")
            assert r[str(VIP1)]["failback"] == "n1" and r[str(VIP1)]["failback_at"], r[str(VIP1)]
            await cluster.wait_holders({VIP1: "n1", VIP2: "n2", FOLLOW: "n1"}, timeout=5)
            nursery.cancel_scope.cancel()


def test_drain_mark_is_read_back(tmp_path: Path) -> None:
    from duravip.daemon.operator import read_drain, write_drain

    assert read_drain(tmp_path) is None
    write_drain(tmp_path, 1234.5)
    assert read_drain(tmp_path) == 1234.5
    (tmp_path / "drained").write_text("garbage")
    assert read_drain(tmp_path) == 0.0  # present but unreadable: stay drained
    write_drain(tmp_path, None)
    assert read_drain(tmp_path) is None
    assert os.listdir(tmp_path) == []


async def test_a_reload_restarts_the_health_checks(cluster: Cluster) -> None:
    check = cluster.tmp / "fail.sh"
    check.write_text("#!/bin/sh\nexit 1\n")
    check.chmod(0o755)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(cluster.run, "n1")
            await nursery.start(cluster.run, "n2")
            await cluster.wait_holders({VIP1: "n1", VIP2: "n2", FOLLOW: "n1"})
            configure(
                cluster, "n1",
                extra=f'Health_Check "bad" {{ type = script path = "{check}" interval = 0.1 }}\n',
            )  # fmt: skip
            assert (await cluster.console("n1", "config", "reload"))["ok"]
            await cluster.wait_holders({VIP1: "n2", VIP2: "n2", FOLLOW: "n2"}, timeout=5)
            status = await cluster.console("n1", "node", "status")
            assert [h["check"] for h in status["data"]["health"]] == ["bad"]  # type: ignore[index]
            assert status["data"]["reason"].startswith("unhealthy: bad")  # type: ignore[index]
            nursery.cancel_scope.cancel()
