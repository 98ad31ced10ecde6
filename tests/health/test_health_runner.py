"""The Trio runners: each check's probe feeding its state machine (fake plumber only)."""

from __future__ import annotations

import os
from functools import partial
from ipaddress import IPv4Address
from pathlib import Path

import trio
import trio.testing

from duravip.config.model import HealthCheck, HostPort
from duravip.health.runner import HealthContext, HealthService, serve
from duravip.plumbing.fake import FakePlumber


def ctx(tmp: Path, plumber: FakePlumber, targets: list[HostPort] | None = None) -> HealthContext:
    return HealthContext(
        smtp_targets=lambda: targets or [],
        spool_path=lambda: tmp,
        interfaces=lambda: {"eth1"},
        plumber=plumber,
    )


async def wait_changed(svc: HealthService, want: bool, timeout: float) -> float:
    """Wait until the verdict is ``want``; returns when (trio clock)."""
    with trio.fail_after(timeout):
        while (not svc.failing(trio.current_time())) != want:
            await svc.changed.wait_transition()
    return trio.current_time()


async def test_link_check_follows_carrier_events(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    plumber = FakePlumber(interfaces=("eth1", "eth2"))
    check = HealthCheck("link", "link", rise=2, interval=0.5)
    async with trio.open_nursery() as nursery:
        svc = await nursery.start(partial(serve, checks=[check], ctx=ctx(tmp_path, plumber)))
        assert svc.reason(trio.current_time()) is None
        plumber.set_carrier("eth2", False)  # not a Topology interface: ignored
        await trio.sleep(1)
        assert not svc.failing(trio.current_time())
        t0 = trio.current_time()
        plumber.set_carrier("eth1", False)
        lost = await wait_changed(svc, False, 1)
        assert lost - t0 < 0.01  # an event, not a poll
        assert svc.reason(lost) == "unhealthy: link (no carrier on eth1)"
        t1 = trio.current_time()
        plumber.set_carrier("eth1", True)
        back = await wait_changed(svc, True, 5)
        assert back - t1 >= 2 * 0.5  # must stay up rise * interval
        assert back - t1 < 1.2
        nursery.cancel_scope.cancel()


async def test_a_short_carrier_blip_back_up_restarts_the_settle_time(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    plumber = FakePlumber()
    check = HealthCheck("link", "link", rise=2, interval=0.5)
    async with trio.open_nursery() as nursery:
        svc = await nursery.start(partial(serve, checks=[check], ctx=ctx(tmp_path, plumber)))
        plumber.set_carrier("eth1", False)
        await wait_changed(svc, False, 1)
        plumber.set_carrier("eth1", True)
        await trio.sleep(0.6)
        plumber.set_carrier("eth1", False)
        await trio.sleep(0.6)
        assert svc.failing(trio.current_time()) == ["link"]
        t = trio.current_time()
        plumber.set_carrier("eth1", True)
        assert await wait_changed(svc, True, 5) - t >= 1.0
        nursery.cancel_scope.cancel()


async def test_smtp_check_reads_a_banner_and_fails_after_fall_probes(tmp_path: Path) -> None:
    answer = [b"220 n1 ESMTP\r\n"]

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            if answer[0]:
                await stream.send_all(answer[0])
            await trio.sleep(1)

    check = HealthCheck("smtp", "smtp", rise=2, fall=2, interval=0.05, timeout=0.2)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            target = [HostPort(IPv4Address("127.0.0.1"), port)]
            svc = await nursery.start(
                partial(serve, checks=[check], ctx=ctx(tmp_path, FakePlumber(), target))
            )
            await trio.sleep(0.3)
            assert not svc.failing(trio.current_time())
            assert svc.states["smtp"].detail.endswith("banner")
            answer[0] = b"421 4.7.0 n1 too many sessions\r\n"  # full, not wedged
            await trio.sleep(0.3)
            assert not svc.failing(trio.current_time())
            assert "busy (421)" in svc.states["smtp"].detail
            answer[0] = b""  # the listener accepts but never greets (wedged)
            t0 = trio.current_time()
            failed = await wait_changed(svc, False, 3)
            assert failed - t0 <= 2 * 0.05 + 2 * 0.2 + 0.1
            assert "no banner within" in (svc.reason(failed) or "")
            answer[0] = b"220 n1 ESMTP\r\n"
            await wait_changed(svc, True, 3)
            nursery.cancel_scope.cancel()


async def test_script_check_exit_status_and_timeout(tmp_path: Path) -> None:
    flag = tmp_path / "ok"
    script = tmp_path / "check.sh"
    script.write_text(f"#!/bin/sh\ntest -e {flag} || exit 3\nsleep \"$(cat {flag})\"\n")
    script.chmod(0o755)
    flag.write_text("0")
    check = HealthCheck("probe", "script", rise=1, fall=1, interval=0.05, timeout=0.5, path=script)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            svc = await nursery.start(partial(serve, checks=[check], ctx=ctx(tmp_path, FakePlumber())))
            await trio.sleep(0.3)
            assert not svc.failing(trio.current_time())
            flag.unlink()
            await wait_changed(svc, False, 3)
            assert svc.states["probe"].detail.endswith("exit 3")
            flag.write_text("0")
            await wait_changed(svc, True, 3)
            flag.write_text("5")  # hangs: killed at the timeout, counted as a failure
            t0 = trio.current_time()
            t = await wait_changed(svc, False, 3)
            assert t - t0 < 1.5 and "killed" in svc.states["probe"].detail
            nursery.cancel_scope.cancel()


async def test_spool_check_needs_a_durable_write_and_free_space(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    checks = [
        HealthCheck("disk", "spool", rise=1, fall=1, interval=0.05, timeout=1.0),
        HealthCheck("huge", "spool", rise=1, fall=1, interval=0.05, timeout=1.0, min_free=2**62),
    ]
    c = HealthContext(lambda: [], lambda: spool, lambda: (), FakePlumber())
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            svc = await nursery.start(partial(serve, checks=checks, ctx=c))
            await trio.sleep(0.3)
            assert svc.failing(trio.current_time()) == ["huge"]
            assert "below min_free" in svc.states["huge"].detail
            assert os.listdir(spool) == []  # the probe file is gone again
            if os.geteuid() != 0:  # root writes anywhere
                spool.chmod(0o500)
                await trio.sleep(0.3)
                assert "disk" in svc.failing(trio.current_time())
            nursery.cancel_scope.cancel()
    spool.chmod(0o700)


async def test_flapping_check_is_held_down_and_reported(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    plumber = FakePlumber()
    check = HealthCheck("link", "link", rise=1, interval=0.1, flap_limit=4, hold_down=30.0)
    async with trio.open_nursery() as nursery:
        svc = await nursery.start(partial(serve, checks=[check], ctx=ctx(tmp_path, plumber)))
        for _ in range(3):
            plumber.set_carrier("eth1", False)
            await trio.sleep(0.5)
            plumber.set_carrier("eth1", True)
            await trio.sleep(0.5)
        now = trio.current_time()
        assert svc.states["link"].status(now) == "flapping"
        assert svc.reason(now) == "flapping: link (carrier on every interface)"
        row = svc.report(now)[0]
        assert row["hold_downs"] == 1 and row["hold_down_left_s"] > 25
        await wait_changed(svc, True, 40)  # released when the hold-down ends
        assert trio.current_time() >= now + 25
        nursery.cancel_scope.cancel()
