"""The daemon's wiring end to end: two in-process nodes (see ``inproc``)."""

from __future__ import annotations

import errno

import pytest
import trio

from .inproc import FOLLOW, VIP1, VIP2, Cluster, banner, cluster

__all__ = ["cluster"]  # the fixture, imported for pytest


async def test_two_nodes_elect_serve_fail_over_and_stop(cluster: Cluster) -> None:
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            await nursery.start(cluster.run, "n1")
            await nursery.start(cluster.run, "n2")
            # Preferences honoured; the follow listener goes with its binding.
            await cluster.wait_holders({VIP1: "n1", VIP2: "n2", FOLLOW: "n1"})
            assert "n1" in await banner(VIP1, cluster.smtp_port)
            assert "n2" in await banner(VIP2, cluster.smtp_port)

            # n1 may still be fetching n2's mature view for a moment after the
            # addresses settled (views travel by gossip, then TCP): poll, bounded.
            with trio.fail_after(5):
                while True:
                    show = await cluster.console("n1", "cluster", "duravip", "show")
                    rows = {d["ip"]: d for d in show["data"]["duravips"]}  # type: ignore[index]
                    if rows[str(VIP2)]["owner"] == "n2":
                        break
                    await trio.sleep(0.02)
            assert rows[str(VIP2)]["holders"] == ["n2"]
            explain = await cluster.console("n2", "cluster", "duravip", "explain", str(VIP1))
            assert explain["ok"] and explain["data"]["decision"]["owner"] == "n1"  # type: ignore[index]

            # n2 dies without a word (its scope is cancelled: no leave, no release
            # announcement); its exit guard unplumbs, n1 detects it and takes VIP2.
            cluster.scopes["n2"].cancel()
            await cluster.wait_holders({VIP1: "n1", VIP2: "n1", FOLLOW: "n1"}, timeout=10)
            assert "n1" in await banner(VIP2, cluster.smtp_port)
            members = await cluster.console("n1", "cluster", "membership")
            states = {m["name"]: m["state"] for m in members["data"]["members"]}  # type: ignore[index]
            assert states["n2"] in ("dead", "suspect")

            # Graceful stop through the console: everything released, clean exit.
            reply = await cluster.console("n1", "shutdown")
            assert reply["ok"]
    assert cluster.plumbers["n1"].addresses == {}
    assert not (cluster.tmp / "n1" / "control.sock").exists()


async def test_reload_rejects_a_bad_config_and_keeps_running(cluster: Cluster) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(cluster.run, "n1")
            await cluster.wait_holders({VIP1: "n1", VIP2: "n1"})
            path = cluster.paths["n1"]
            good = path.read_text()
            path.write_text(good.replace('Enable_Duravip = true  Bind_Address = "127.0.1.2"', "Bogus_Key = 1"))
            reply = await cluster.console("n1", "config", "reload")
            assert not reply["ok"] and "Bogus_Key" in str(reply["error"])
            assert "n1" in await banner(VIP2, cluster.smtp_port)
            # Drop VIP2 from the config: the reload releases it.
            path.write_text(good.replace(f'  Listen "{VIP2}:{cluster.smtp_port}" {{ Enable_Duravip = true }}\n', "")
                            .replace('Binding "b2" { Enable_Duravip = true  Bind_Address = "127.0.1.2"  Duravip_Preference = "n2" }', ""))
            reply = await cluster.console("n1", "config", "reload")
            assert reply["ok"], reply
            with trio.fail_after(5):
                while VIP2 in cluster.plumbers["n1"].addresses:
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()


async def test_console_during_the_state_sync(cluster: Cluster) -> None:
    """n1 alone: its seed n2 never answers, so it waits out the sync budget (2 s)."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(cluster.run, "n1")
            with trio.fail_after(5):
                while True:
                    try:
                        members = await cluster.console("n1", "cluster", "membership")
                    except OSError:  # control socket not bound yet
                        await trio.sleep(0.02)
                        continue
                    if members["ok"]:
                        break
                    await trio.sleep(0.02)
            assert [m["name"] for m in members["data"]["members"]] == ["n1"]  # type: ignore[index]
            info = await cluster.console("n1", "cluster", "info")
            assert info["ok"] and info["data"]["held"] == []  # type: ignore[index]
            show = await cluster.console("n1", "cluster", "duravip", "show")
            rows = show["data"]["duravips"]  # type: ignore[index]
            assert show["ok"] and {r["reason"] for r in rows} == {None}  # not resolved yet
            assert {r["ip"] for r in rows} == {str(VIP1), str(VIP2), str(FOLLOW)}
            announce = await cluster.console("n1", "broadcast", "cluster", "duravip", "announce", "view")
            assert not announce["ok"] and "node still joining" in str(announce["error"])
            scraped = await cluster.console("n1", "metrics")
            text = str(scraped["data"]["prometheus"])  # type: ignore[index]
            # The services started so far already show (the resolver's family not yet).
            assert 'duravip_members{state="alive"} 1.0' in text
            assert "duravip_swim_total" in text and "duravip_ips_held 0.0" in text
            assert "duravip_election_total" not in text
            help_ = await cluster.console("n1", "help")
            assert help_["ok"] and "broadcast cluster duravip announce view" in str(help_["data"])
            # Once the sync has timed out the resolver runs and every command answers.
            await cluster.wait_holders({VIP1: "n1", VIP2: "n1"})
            with trio.fail_after(5):
                while len((await cluster.console("n1", "cluster", "info"))["data"]["held"]) < 3:  # type: ignore[index]
                    await trio.sleep(0.02)
            show = await cluster.console("n1", "cluster", "duravip", "show")
            assert {r["owner"] for r in show["data"]["duravips"]} == {"n1"}  # type: ignore[index]
            announce = await cluster.console("n1", "broadcast", "cluster", "duravip", "announce", "view")
            assert announce["ok"], announce
            nursery.cancel_scope.cancel()


async def test_a_listener_that_stops_for_good_hands_its_ip_to_a_peer(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """accept() fails with a non-capacity error on n1's VIP1 listener: n1 must not
    keep VIP1 plumbed with nothing accepting (a half-alive node): it withdraws the
    IP, n2 takes it over, and the failure is counted."""
    real_accept = trio.SocketListener.accept
    armed = False

    async def accept_once_broken(self: trio.SocketListener) -> trio.SocketStream:
        nonlocal armed
        if armed and self.socket.getsockname()[0] == str(VIP1):
            armed = False  # one shot: n2's own VIP1 listener must work
            raise OSError(errno.EBADF, "injected")
        return await real_accept(self)

    monkeypatch.setattr(trio.SocketListener, "accept", accept_once_broken)
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            await nursery.start(cluster.run, "n1")
            await nursery.start(cluster.run, "n2")
            await cluster.wait_holders({VIP1: "n1", VIP2: "n2", FOLLOW: "n1"})
            armed = True
            # The in-flight accept() returns this session; the next one fails.
            assert "n1" in await banner(VIP1, cluster.smtp_port)
            await cluster.wait_holders({VIP1: "n2", VIP2: "n2", FOLLOW: "n2"}, timeout=10)
            assert not armed
            assert "n2" in await banner(VIP1, cluster.smtp_port)
            reply = await cluster.console("n1", "metrics")
            text: str = reply["data"]["prometheus"]  # type: ignore[index]
            assert 'duravip_smtp_total{counter="listener_failures"} 1' in text
            nursery.cancel_scope.cancel()
