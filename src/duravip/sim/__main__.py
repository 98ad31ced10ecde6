"""``python -m duravip.sim``: one simulated run, figures as JSON.

Example: ``python -m duravip.sim --nodes 100 --seconds 30 --seed 1 --loss 0.1
--kill 3 --profile fast --json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import trio
import trio.testing

from duravip.config.model import PRESETS
from duravip.sim.network import Simulation


def percentile(values: Sequence[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    idx = min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))
    return s[idx]


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 1)


async def scenario(
    *,
    nodes: int,
    seconds: float,
    seed: int,
    loss: float,
    kill: int,
    profile: str,
    meta_changes: int = 5,
    meta_size: int = 1024,
    warmup: float = 2.0,
    restart_after: float = 0.0,
    replay_every: float = 0.0,
) -> dict[str, Any]:
    """Bootstrap ``nodes``, kill ``kill`` of them and change some views; measure.

    With ``restart_after`` every victim comes back (fresh process, same name) that
    long after its kill, so a small cluster can be killed many times. With
    ``replay_every`` a keyless attacker re-sends captured datagrams that often.
    """
    timers = PRESETS[profile]
    sim = Simulation(timers=timers, seed=seed, loss=loss)
    sim.add_cluster(nodes)
    if replay_every > 0:
        sim.add_attacker(interval=replay_every, seed=seed)
    await sim.run_for(warmup)
    sim.msgs_sent = sim.bytes_sent = 0
    sim.up_node_seconds = 0.0
    start = sim.now
    names = list(sim.nodes)
    if restart_after > 0:
        pool = names[1:] if nodes > 1 else []
        victims = [sim.rng.choice(pool) for _ in range(kill)] if pool else []
    else:
        victims = sim.rng.sample(names, min(kill, max(0, nodes - 2)))
    others = [n for n in names if n not in victims]
    actions: list[tuple[float, str, str]] = []
    for i, v in enumerate(victims):
        t = start + seconds * 0.6 * (i + 0.5) / len(victims)
        actions.append((t, "kill", v))
        if restart_after > 0:
            actions.append((t + restart_after, "restart", v))
    for j in range(meta_changes):
        owner = sim.rng.choice(others or names)
        actions.append((start + seconds * 0.7 * (j + 0.5) / meta_changes, "meta", owner))
    actions.sort()
    for t, what, who in actions:
        await sim.run_until(t)
        if what == "kill":
            if sim.nodes[who].status == "up":
                sim.kill(who)
        elif what == "restart":
            if sim.nodes[who].status == "crashed":
                sim.restart(who)
        else:
            sim.change_meta(who, sim.rng.randbytes(meta_size))
    await sim.run_until(start + seconds)
    detect = [k.done - k.time for k in sim.kills if k.done is not None]
    dissem = [c.done - c.time for c in sim.meta_changes if c.done is not None]
    return {
        "nodes": nodes,
        "profile": profile,
        "seconds": seconds,
        "seed": seed,
        "restart_after": restart_after,
        "loss": loss,
        "kills": len(sim.kills),
        "undetected": sum(1 for k in sim.kills if k.done is None),
        "detect_ms": {
            "p50": _ms(percentile(detect, 50)),
            "p99": _ms(percentile(detect, 99)),
            "max": _ms(max(detect) if detect else None),
        },
        "meta_changes": len(sim.meta_changes),
        "undisseminated": sum(1 for c in sim.meta_changes if c.done is None),
        "disseminate_ms": {"p50": _ms(percentile(dissem, 50)), "p99": _ms(percentile(dissem, 99))},
        "false_dead": len(sim.false_dead),
        "false_dead_events": len(sim.false_dead_events),
        "inc_violations": len(sim.inc_violations),
        "replays_sent": sum(a.sent for a in sim.attackers),
        "dropped_replay": sum(nd.swim.counters["dropped_replay"] for nd in sim.nodes.values()),
        "sent_to_unknown": len(sim.sent_to_unknown),
        # per running node: crashed nodes send nothing and carry no load
        "msgs_per_node_per_s": round(sim.msgs_sent / sim.up_node_seconds, 2),
        "bytes_per_node_per_s": round(sim.bytes_sent / sim.up_node_seconds, 1),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m duravip.sim", description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=10)
    p.add_argument("--seconds", type=float, default=30.0, help="simulated seconds measured")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--loss",
        type=float,
        default=0.0,
        help="packet loss per datagram: a probability (0.1) or a percentage (10)",
    )
    p.add_argument("--kill", type=int, default=1, help="nodes crashed during the run")
    p.add_argument("--profile", choices=sorted(PRESETS), default="lan")
    p.add_argument(
        "--restart-after",
        type=float,
        default=0.0,
        help="restart each victim this long after its kill",
    )
    p.add_argument(
        "--replay-attack",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="a keyless attacker re-sends captured datagrams this often (0: none)",
    )
    p.add_argument("--meta-changes", type=int, default=5)
    p.add_argument("--meta-size", type=int, default=1024)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    result = trio.run(
        lambda: scenario(
            nodes=args.nodes,
            seconds=args.seconds,
            seed=args.seed,
            loss=args.loss / 100.0 if args.loss > 1.0 else args.loss,
            kill=args.kill,
            profile=args.profile,
            meta_changes=args.meta_changes,
            meta_size=args.meta_size,
            restart_after=args.restart_after,
            replay_every=args.replay_attack,
        ),
        clock=trio.testing.MockClock(autojump_threshold=0),
    )
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:22} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
