"""Real UDP/TCP on 127.0.0.1: serve() instances form a cluster, see a kill, refuse a wrong key."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Callable

import attrs
import trio

from duravip.config.model import PRESETS
from duravip.swim.crypto import Keyring
from duravip.swim.driver import Membership, MembershipService, serve

TIMERS = attrs.evolve(PRESETS["fast"], push_pull_interval=1.0, dead_node_reclaim_time=30.0)


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port: int = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


async def wait_for(
    svc: MembershipService, pred: Callable[[Membership], bool], timeout: float
) -> None:
    with trio.fail_after(timeout):
        await svc.snapshot.wait_value(pred)


def states(m: Membership) -> dict[str, str]:
    return {n: str(x.state) for n, x in m.members.items()}


async def start(
    nursery: trio.Nursery,
    name: str,
    port: int,
    keyring: Keyring,
    seeds: list[int],
    meta: bytes = b"",
) -> tuple[MembershipService, trio.CancelScope]:
    scope = trio.CancelScope()

    async def run(
        task_status: trio.TaskStatus[MembershipService] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with scope:
            await serve(
                name=name,
                bind=("127.0.0.1", port),
                cluster="test",
                timers=TIMERS,
                keyring=keyring,
                seeds=[("127.0.0.1", p) for p in seeds],
                meta=meta,
                task_status=task_status,
            )

    svc: MembershipService = await nursery.start(run)
    return svc, scope


async def test_cluster_forms_detects_kill_and_refuses_wrong_key() -> None:
    key = Keyring.generate()
    ports = [free_port() for _ in range(4)]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            a, _ = await start(nursery, "a", ports[0], key, [], meta=b"view-a")
            b, _ = await start(nursery, "b", ports[1], key, [ports[0]])
            c, c_scope = await start(nursery, "c", ports[2], key, [ports[0]])
            everyone = {"a", "b", "c"}

            def all_alive(m: Membership) -> bool:
                return all(states(m).get(n) == "alive" for n in everyone)

            for svc in (a, b, c):
                await wait_for(svc, all_alive, 10)
            # the full view travels by TCP
            await wait_for(c, lambda m: m.members["a"].meta == b"view-a", 5)
            a.set_meta(b"view-a-2" * 1000)
            await wait_for(b, lambda m: m.members["a"].meta == b"view-a-2" * 1000, 5)

            # a node with the wrong key never gets in
            intruder, i_scope = await start(nursery, "x", ports[3], Keyring.generate(), [ports[0]])
            await trio.sleep(1.0)
            assert "x" not in a.snapshot.value.members
            assert states(intruder.snapshot.value) == {"x": "alive"}
            assert a.counters["dropped_stream_decrypt"] >= 1
            i_scope.cancel()

            # a cancelled (crashed) node is declared dead
            c_scope.cancel()
            await wait_for(a, lambda m: states(m).get("c") == "dead", 5)
            await wait_for(b, lambda m: states(m).get("c") == "dead", 5)
            nursery.cancel_scope.cancel()


async def test_graceful_leave_and_key_rotation() -> None:
    old, new = Keyring.generate(), Keyring.generate()
    ports = [free_port() for _ in range(2)]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            a, _ = await start(nursery, "a", ports[0], old, [])
            b, b_scope = await start(nursery, "b", ports[1], old, [ports[0]])
            await wait_for(a, lambda m: states(m).get("b") == "alive", 10)
            # rotation: add new everywhere, make it primary, drop the old one
            both_old_first = Keyring([*old.keys, *new.keys])
            both_new_first = Keyring([*new.keys, *old.keys])
            for ring in (both_old_first, both_new_first):
                a.set_keyring(ring)
                b.set_keyring(ring)
                await trio.sleep(0.3)
            a.set_keyring(new)
            b.set_keyring(new)
            before = a.counters["acks_recv"]
            await trio.sleep(0.5)
            assert a.counters["acks_recv"] > before
            assert a.counters["dropped_decrypt"] == 0
            assert states(a.snapshot.value)["b"] == "alive"
            await b.leave(2.0)
            b_scope.cancel()
            await wait_for(a, lambda m: states(m).get("b") == "left", 2)
            nursery.cancel_scope.cancel()


async def test_port_unreachable_is_only_a_hint() -> None:
    key = Keyring.generate()
    ports = [free_port() for _ in range(2)]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            a, _ = await start(nursery, "a", ports[0], key, [])
            _b, b_scope = await start(nursery, "b", ports[1], key, [ports[0]])
            await wait_for(a, lambda m: states(m).get("b") == "alive", 10)
            b_scope.cancel()  # the process is gone, its port answers ICMP port unreachable
            with trio.fail_after(3):
                while a.counters["unreachable_hints"] == 0:
                    await trio.sleep(0.01)
            assert states(a.snapshot.value)["b"] in ("alive", "suspect")  # a hint kills nobody
            await wait_for(a, lambda m: states(m).get("b") == "dead", 5)
            nursery.cancel_scope.cancel()


NODE_PROC = """
import json, sys, trio, attrs
from duravip.config.model import PRESETS
from duravip.swim.crypto import Keyring
from duravip.swim.driver import serve

name, port, seed, key = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

async def main():
    async with trio.open_nursery() as n:
        svc = await n.start(lambda task_status: serve(
            name=name, bind=("127.0.0.1", port), cluster="proc",
            timers=attrs.evolve(PRESETS["fast"], dead_node_reclaim_time=60.0),
            keyring=Keyring.parse(key), seeds=[("127.0.0.1", seed)] if seed else [],
            task_status=task_status))
        async for m in svc.snapshot.eventual_values():
            print(json.dumps({k: str(v.state) for k, v in m.members.items()}), flush=True)

trio.run(main)
"""


async def test_two_processes_form_a_cluster_and_detect_a_sigkill() -> None:
    key = Keyring.generate().dumps()
    pa, pb = free_port(), free_port()
    procs: list[trio.Process] = []
    try:
        with trio.fail_after(30):
            a = await trio.lowlevel.open_process(
                [sys.executable, "-c", NODE_PROC, "a", str(pa), "0", key], stdout=subprocess.PIPE
            )
            procs.append(a)
            b = await trio.lowlevel.open_process(
                [sys.executable, "-c", NODE_PROC, "b", str(pb), str(pa), key],
                stdout=subprocess.DEVNULL,
            )
            procs.append(b)
            assert a.stdout is not None
            buf = b""

            async def next_state() -> dict[str, str]:
                nonlocal buf
                while b"\n" not in buf:
                    chunk = await a.stdout.receive_some()  # type: ignore[union-attr]
                    assert chunk, "node a exited"
                    buf += chunk
                line, buf = buf.split(b"\n", 1)
                out: dict[str, str] = json.loads(line)
                return out

            while (await next_state()).get("b") != "alive":
                pass
            b.send_signal(signal.SIGKILL)
            while (await next_state()).get("b") != "dead":
                pass
    finally:
        for p in procs:  # only the processes this test started, by handle
            if p.returncode is None:
                p.kill()
            with trio.move_on_after(5):
                await p.wait()
