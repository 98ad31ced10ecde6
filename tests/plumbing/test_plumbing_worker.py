"""Worker logic on the in-memory FakePlumber under the autojump clock."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ipaddress import IPv4Address, IPv4Network

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from duravip.config.model import Topology
from duravip.plumbing.fake import FakePlumber
from duravip.plumbing.worker import PlumbingWorker, clean_slate, serve

TOPO = (Topology(IPv4Network("10.9.1.0/24"), "eth1"), Topology(IPv4Network("10.9.2.0/24"), "eth2"))
MAIN = IPv4Address("10.9.1.1")
VIPS = frozenset(IPv4Address(f"10.9.1.{i}") for i in range(10, 20))
OTHER = IPv4Address("10.9.2.10")  # managed, on eth2
NOTOPO = IPv4Address("10.8.0.1")  # managed by config mistake, no Topology
MANAGED = VIPS | {OTHER, NOTOPO, MAIN}
V = sorted(VIPS)


@asynccontextmanager
async def running(
    fake: FakePlumber, *, garp_count: int = 3, clean_start: bool = True
) -> AsyncIterator[PlumbingWorker]:
    async with trio.open_nursery() as nursery:
        worker: PlumbingWorker = await nursery.start(
            lambda task_status: serve(
                plumber=fake,
                managed=MANAGED,
                topology=TOPO,
                forbidden=frozenset({MAIN}),
                announce_all_hosts=True,
                garp_count=garp_count,
                garp_interval=0.2,
                reconcile_interval=1.0,
                clean_start=clean_start,
                task_status=task_status,
            )
        )
        yield worker
        nursery.cancel_scope.cancel()


async def test_ensure_remove_and_garp_rounds(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakePlumber(["eth1", "eth2"])
    with trio.fail_after(30):
        async with running(fake) as w:
            got = await w.ensure(frozenset(V[:3]))
            assert got == frozenset(V[:3]) and w.present.value == got
            assert set(fake.addresses) == set(V[:3])
            assert fake.announced == V[:3]  # first round before ensure returns
            await trio.sleep(1)
            assert fake.announced == V[:3] * 3  # then 2 more rounds, 0.2 s apart
            assert await w.ensure(frozenset(V[:3])) == frozenset(V[:3])  # idempotent
            await w.remove(frozenset(V[:2]))
            assert set(fake.addresses) == {V[2]} and w.present.value == {V[2]}
            assert w.desired == {V[2]}


async def test_refuses_unmanaged_forbidden_and_no_topology(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakePlumber(["eth1", "eth2"])
    fake.add_externally(IPv4Address("10.9.1.99"))  # not managed: never touched
    with trio.fail_after(30):
        async with running(fake) as w:
            got = await w.ensure(frozenset({MAIN, NOTOPO, IPv4Address("10.9.1.99"), OTHER}))
            assert got == {OTHER}
            assert fake.addresses == {IPv4Address("10.9.1.99"): "eth1", OTHER: "eth2"}
            await w.remove(frozenset({IPv4Address("10.9.1.99")}))
            await trio.sleep(5)
            assert IPv4Address("10.9.1.99") in fake.addresses
            for c in fake.calls:
                assert MAIN not in c.ips and IPv4Address("10.9.1.99") not in c.ips
    text = caplog.text
    assert "main address" in text and "no Topology" in text and "not a managed DuraVIP" in text


async def test_clean_slate_removes_only_managed(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakePlumber(["eth1", "eth2"])
    for ip in (V[0], V[1], OTHER):
        fake.add_externally(ip)
    fake.add_externally(IPv4Address("10.9.1.200"))
    with trio.fail_after(10):
        removed = await clean_slate(fake, VIPS | {OTHER}, TOPO)
    assert removed == {V[0], V[1], OTHER}
    assert set(fake.addresses) == {IPv4Address("10.9.1.200")}


async def test_serve_starts_clean(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakePlumber(["eth1", "eth2"])
    fake.add_externally(V[5])
    fake.add_externally(MAIN)  # the node's own address survives clean slate
    with trio.fail_after(10):
        async with running(fake) as w:
            assert set(fake.addresses) == {MAIN} and w.present.value == frozenset()


async def test_retry_with_backoff(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "duravip.plumbing")
    fake = FakePlumber(["eth1", "eth2"])
    fake.fail_ip(V[0], "EBUSY (injected)", times=4)
    with trio.fail_after(60):
        async with running(fake, garp_count=1) as w:
            t0 = trio.current_time()
            got = await w.ensure(frozenset(V[:2]))
            assert got == {V[1]} and w.failures[V[0]].attempts == 1
            await w.present.wait_value(lambda s: V[0] in s)
            elapsed = trio.current_time() - t0
            attempts = [c for c in fake.ops("plumb") if V[0] in c.ips]
            await trio.sleep(0.1)  # the repaired IP is announced right after
    # 4 failures then success: waits of 0.5 + 1 + 2 + 4 s (plus at most a debounce each).
    assert len(attempts) == 5
    assert 7.5 <= elapsed <= 8.0
    assert (
        "plumb 10.9.1.10 on eth1 failed (attempt 4): EBUSY (injected); retrying in 4.0 s"
        in caplog.text
    )
    assert "succeeded after 4 failed attempts" in caplog.text
    assert fake.announced.count(V[0]) == 1


async def test_whole_call_failure_is_retried(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakePlumber(["eth1", "eth2"])
    fake.fail_next_call("plumb")
    with trio.fail_after(30):
        async with running(fake, garp_count=1) as w:
            assert await w.ensure(frozenset(V[:3])) == frozenset()
            await w.present.wait_value(lambda s: s == frozenset(V[:3]))
            assert not w.failures


async def test_external_removal_is_repaired(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakePlumber(["eth1", "eth2"])
    with trio.fail_after(30):
        async with running(fake, garp_count=1) as w:
            await w.ensure(frozenset(V[:3]))
            t0 = trio.current_time()
            fake.remove_externally(V[1])  # also bumps `changed`: event-driven reconcile
            await trio.sleep(0.2)
            assert V[1] in fake.addresses
            assert trio.current_time() - t0 < 1.0
            assert fake.announced.count(V[1]) == 2 and w.repaired == 1
    assert "10.9.1.11 was removed from outside; putting it back" in caplog.text


async def test_periodic_reconcile_without_events(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakePlumber(["eth1", "eth2"])
    with trio.fail_after(30):
        async with running(fake, garp_count=1) as w:
            await w.ensure(frozenset(V[:3]))
            fake.addresses.pop(V[0])  # silently, no change event
            fake.addresses[V[5]] = "eth1"  # a managed IP nobody wants here
            await trio.sleep(1.2)
            assert set(fake.addresses) == set(V[:3])


async def test_interface_down_and_gone(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakePlumber(["eth1", "eth2"])
    with trio.fail_after(60):
        async with running(fake, garp_count=1) as w:
            fake.set_interface("eth2", exists=False)
            assert await w.ensure(frozenset({OTHER})) == frozenset()
            assert "interface eth2 not found" in w.failures[OTHER].error
            fake.set_interface("eth2", up=False)
            await trio.sleep(0.6)
            assert "interface eth2 is down" in w.failures[OTHER].error
            fake.set_interface("eth2", up=True)
            await w.present.wait_value(lambda s: OTHER in s)
            assert not w.failures
    assert "interface eth2 not found" in caplog.text and "interface eth2 is down" in caplog.text


async def test_set_managed_retires_dropped_ips(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakePlumber(["eth1", "eth2"])
    with trio.fail_after(30):
        async with running(fake, garp_count=1) as w:
            await w.ensure(frozenset(V[:3]))
            w.set_managed(frozenset(V[1:]) | {MAIN}, TOPO)
            await trio.sleep(0.2)
            assert set(fake.addresses) == set(V[1:3])
            assert w.desired == set(V[1:3])
            fake.add_externally(V[0])  # no longer ours: left alone from now on
            await trio.sleep(3)
            assert V[0] in fake.addresses


async def test_failed_removal_is_retried(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakePlumber(["eth1", "eth2"])
    with trio.fail_after(30):
        async with running(fake, garp_count=1) as w:
            await w.ensure(frozenset(V[:2]))
            fake.fail_ip(V[0], "EPERM (injected)", times=2)
            await w.remove(frozenset(V[:2]))
            assert V[0] in fake.addresses and V[0] in w.failures
            await w.present.wait_value(lambda s: not s)
            assert fake.addresses == {}


ops = st.lists(
    st.tuples(
        st.sampled_from(["ensure", "remove", "external_del", "external_add", "fail", "sleep"]),
        st.sets(st.sampled_from(sorted(MANAGED | {IPv4Address("10.9.1.99")})), max_size=4),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_worker_converges_to_desired(steps: list[tuple[str, set[IPv4Address]]]) -> None:
    """Whatever happens, after a quiet period the interfaces hold exactly the
    desired placeable IPs, and an unmanaged address is never touched."""
    stranger = IPv4Address("10.9.1.99")

    async def main() -> None:
        fake = FakePlumber(["eth1", "eth2"])
        fake.add_externally(stranger)
        with trio.fail_after(300):
            async with running(fake, garp_count=2) as w:
                for op, ips in steps:
                    if op == "ensure":
                        await w.ensure(frozenset(ips))
                    elif op == "remove":
                        await w.remove(frozenset(ips))
                    elif op == "external_del":
                        fake.remove_externally(*(ips - {stranger}))
                    elif op == "external_add":
                        for ip in ips - {stranger, MAIN}:
                            fake.add_externally(ip, "eth1")
                    elif op == "fail":
                        for ip in ips:
                            fake.fail_ip(ip, times=2)
                    else:
                        await trio.sleep(0.3)
                await trio.sleep(40)  # longer than the backoff cap: everything retried
                want = w.desired
                assert want <= (VIPS | {OTHER})
                assert {ip for ip in fake.addresses if ip != stranger} == want
                assert w.present.value == want
                assert fake.addresses[stranger] == "eth1"
                assert all(stranger not in c.ips and MAIN not in c.ips for c in fake.calls)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
