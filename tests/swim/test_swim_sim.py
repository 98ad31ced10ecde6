"""Simulator scenarios: the real core over an in-memory network under the autojump clock."""

from __future__ import annotations

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from duravip.config.model import PRESETS
from duravip.sim import Simulation
from duravip.swim.crypto import Keyring
from duravip.swim.members import State

FAST = PRESETS["fast"]


def states_of(sim: Simulation, subject: str) -> set[State | None]:
    out: set[State | None] = set()
    for nd in sim.up():
        if nd.name != subject:
            m = nd.swim.members().get(subject)
            out.add(None if m is None else m.state)
    return out


async def test_kill_is_detected_quickly(autojump_clock: object) -> None:
    with trio.fail_after(60):
        sim = Simulation(timers=FAST, seed=1)
        sim.add_cluster(5)
        await sim.run_for(2)
        sim.kill("n2")
        await sim.run_for(2)
        assert states_of(sim, "n2") == {State.DEAD}
        (k,) = sim.kills
        assert k.done is not None and k.done - k.time < 1.0
        assert not sim.false_dead


async def test_pause_three_seconds_then_refute(autojump_clock: object) -> None:
    with trio.fail_after(60):
        sim = Simulation(timers=FAST, seed=2)
        sim.add_cluster(5)
        await sim.run_for(2)
        inc = sim.nodes["n1"].swim.local.incarnation
        sim.pause("n1")
        await sim.run_for(3)
        assert states_of(sim, "n1") == {State.DEAD}  # paused for 3 s under `fast`: declared dead
        sim.resume("n1")
        await sim.run_for(2)
        assert states_of(sim, "n1") == {State.ALIVE}
        assert sim.nodes["n1"].swim.local.incarnation > inc
        assert sim.live_view("n1") == frozenset(sim.nodes)
        assert not sim.false_dead and not sim.inc_violations


async def test_partition_and_heal_converge(autojump_clock: object) -> None:
    with trio.fail_after(120):
        sim = Simulation(timers=FAST, seed=3)
        sim.add_cluster(6)
        await sim.run_for(1)
        sim.partition(["n0", "n1", "n2"], ["n3", "n4", "n5"])
        await sim.run_for(5)
        assert sim.live_view("n0") == {"n0", "n1", "n2"}
        assert sim.live_view("n5") == {"n3", "n4", "n5"}
        sim.heal()
        took = await sim.run_until_converged(60)
        assert took is not None, "no convergence within 60 s after the heal"
        assert not sim.inc_violations


async def test_ten_percent_loss_no_false_dead_with_fast(autojump_clock: object) -> None:
    # seeds 2 and 3 of the 10-node run do produce false deaths without the buddy probes
    with trio.fail_after(600):  # virtual seconds
        for seed, n, kill in ((4, 3, False), (2, 10, True), (3, 10, True)):
            sim = Simulation(timers=FAST, seed=seed, loss=0.10)
            sim.add_cluster(n)
            await sim.run_for(10)
            if kill:
                sim.kill(f"n{n - 1}")
            await sim.run_for(50)
            assert not sim.false_dead, sim.false_dead_events
            assert all(k.done is not None and k.done - k.time < 1.0 for k in sim.kills)
            assert sim.converged()


async def test_mass_restart(autojump_clock: object) -> None:
    with trio.fail_after(120):
        sim = Simulation(timers=FAST, seed=6)
        sim.add_cluster(6)
        await sim.run_for(1)
        for i in range(1, 6):
            sim.kill(f"n{i}")
        await sim.run_for(1)
        for i in range(1, 6):
            sim.restart(f"n{i}", seeds=[sim.nodes["n0"].addr], meta=f"v{i}".encode())
        took = await sim.run_until_converged(20)
        assert took is not None
        for i in range(1, 6):
            assert sim.nodes["n0"].swim.members()[f"n{i}"].meta == f"v{i}".encode()
        assert not sim.inc_violations


async def test_key_rotation_without_disruption(autojump_clock: object) -> None:
    with trio.fail_after(60):
        old, new = Keyring.generate(), Keyring.generate()
        sim = Simulation(timers=FAST, seed=7, keyring=old)
        sim.add_cluster(5)
        await sim.run_for(1)
        for ring in (Keyring([*old.keys, *new.keys]), Keyring([*new.keys, *old.keys]), new):
            for nd in sim.nodes.values():  # one node at a time, as an operator's reload would go
                nd.swim.set_keyring(ring)
                await sim.run_for(0.2)
            await sim.run_for(1)
        assert all(nd.swim.counters["dropped_decrypt"] == 0 for nd in sim.nodes.values())
        assert all(nd.swim.counters["suspected"] == 0 for nd in sim.nodes.values())
        assert sim.converged()
        # and the old key is really gone now
        stranger = sim.add_node("old", seeds=[sim.nodes["n0"].addr], keyring=old)
        await sim.run_for(2)
        assert "old" not in sim.live_view("n0")
        assert stranger.swim.counters["push_pull_failed"] >= 1


async def test_meta_change_converges_quickly(autojump_clock: object) -> None:
    with trio.fail_after(60):
        sim = Simulation(timers=PRESETS["lan"], seed=8)
        sim.add_cluster(20)
        await sim.run_for(1)
        sim.change_meta("n3", b"x" * 120_000)
        sim.change_meta("n7", b"y" * 10)
        await sim.run_for(2)
        for c in sim.meta_changes:
            assert c.done is not None and c.done - c.time < 1.0
        assert sim.converged()


async def test_graceful_leave(autojump_clock: object) -> None:
    with trio.fail_after(60):
        sim = Simulation(timers=PRESETS["lan"], seed=9)
        sim.add_cluster(5)
        await sim.run_for(1)
        sim.leave("n4")
        await sim.run_for(0.05)
        assert states_of(sim, "n4") == {State.LEFT}
        await sim.run_for(2)
        assert sim.nodes["n4"].swim.left_done()
        sim.stop_left("n4")
        await sim.run_for(5)
        assert all(nd.swim.counters["suspected"] == 0 for nd in sim.up())


async def test_no_fault_no_false_dead(autojump_clock: object) -> None:
    with trio.fail_after(60):
        sim = Simulation(timers=FAST, seed=10, jitter=0.002)
        sim.add_cluster(30)
        await sim.run_for(20)
        assert not sim.false_dead
        assert all(nd.swim.counters["suspected"] == 0 for nd in sim.up())


FAULT = st.tuples(
    st.sampled_from(["kill", "pause", "partition", "loss", "restart"]),
    st.integers(0, 4),
    st.floats(0.0, 8.0),
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(faults=st.lists(FAULT, max_size=6), seed=st.integers(0, 2**16))
async def test_random_fault_schedules_converge(
    autojump_clock: object, faults: list[tuple[str, int, float]], seed: int
) -> None:
    """Whatever happened, once faults end the live nodes agree; incarnations never go back."""
    with trio.fail_after(300):
        sim = Simulation(timers=FAST, seed=seed)
        sim.add_cluster(5)
        start = sim.now
        for what, i, at in sorted(faults, key=lambda f: f[2]):
            await sim.run_until(start + at)
            name = f"n{i}"
            if what == "kill" and sim.nodes[name].status == "up" and len(sim.up()) > 2:
                sim.kill(name)
            elif what == "restart" and sim.nodes[name].status == "crashed":
                sim.restart(name)
            elif what == "pause" and sim.nodes[name].status == "up":
                sim.pause(name)
            elif what == "partition":
                sim.partition([f"n{j}" for j in range(i + 1)])
            elif what == "loss":
                sim.set_loss(0.2)
        await sim.run_until(start + 10)
        # faults end: heal, resume the paused, bring the crashed back
        sim.heal()
        sim.set_loss(0.0)
        for nd in list(sim.nodes.values()):
            if nd.status == "paused":
                sim.resume(nd.name)
            elif nd.status == "crashed":
                sim.restart(nd.name)
        took = await sim.run_until_converged(45)
        assert took is not None, "live nodes did not converge within 45 s"
        assert not sim.inc_violations
