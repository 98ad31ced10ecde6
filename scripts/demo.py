#!/usr/bin/env python3
"""The main job: a 3-node duravip cluster in network namespaces, end to end.

Mail flows from each DuraVIP's binding IP; the holder of a VIP crashes (the
host is gone) and another node answers on the VIP within a fraction of a
second; it comes back and the VIP fails back once it is mature, with no failed
probe; a node stops gracefully with mail queued and its queue moves to the
node that takes over its binding. Everything is torn down at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from duravip_lab import Lab
from duravip_lab.scenario import (
    PREFERRED,
    VIPS,
    HolderSampler,
    Prober,
    send_mail,
    wait_converged,
    wait_delivered,
)


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def console(lab: Lab, node: str, *words: str) -> str:
    p = lab.console(node, *words)
    return (p.stdout or "") + (p.stderr or "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--name", default=os.environ.get("LAB_NAME", "demo"))
    ap.add_argument("--profile", default="fast", choices=["fast", "lan"])
    ap.add_argument("--keep", action="store_true", help="leave the lab up at the end")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("the demo builds network namespaces: run it as root", file=sys.stderr)
        return 2

    lab = Lab(args.name)
    if lab.exists():
        lab.down()
    figures: dict[str, object] = {}
    try:
        step(f"building a 3-node lab '{args.name}' (profile {args.profile})")
        lab.up(nodes=3, vips=3, profile=args.profile)
        t0 = time.monotonic()
        lab.start()
        held = wait_converged(lab, VIPS, timeout=30, expect=PREFERRED)
        figures["converge_s"] = round(time.monotonic() - t0, 2)
        print(f"every DuraVIP held by exactly one node after {figures['converge_s']} s:")
        for vip, node in sorted(held.items()):
            print(f"  {vip:<12} {node}")
        step("n1> duravip console cluster duravip show")
        print(console(lab, "n1", "cluster", "duravip", "show"))

        step("mail: follow listener 10.1.2.1 (binding duravip-1), and X-Binding duravip-3 injected on n2")
        ids_follow = send_mail(lab, "10.1.2.1", subject="via follow listener", count=3)
        ids_mmove = send_mail(lab, "10.1.1.2", subject="needs mmove", headers={"X-Binding": "duravip-3"}, count=3)
        seen = wait_delivered(lab, ids_follow + ids_mmove, timeout=30)
        for label, ids, want in (("follow", ids_follow, "10.1.1.1"), ("mmove", ids_mmove, "10.1.1.3")):
            peers = sorted({r["peer_ip"] for i in ids for r in seen[i]})
            print(f"  {label}: {len(ids)} messages delivered once each, from {', '.join(peers)} (binding IP {want})")

        step("crash n2 (SIGKILL + link down) while the client probes 10.1.1.2 every 20 ms")
        prober = Prober(lab, "10.1.1.2", seconds=4.0).start()
        time.sleep(0.5)
        fault = time.time()
        lab.crash("n2")
        prober.join()
        ms = prober.failover_ms(fault)
        figures["crash_failover_ms"] = None if ms is None else round(ms)
        new = wait_converged(lab, VIPS, timeout=10, nodes=["n1", "n3"])
        print(f"  10.1.1.2 answered by {new['10.1.1.2']} {figures['crash_failover_ms']} ms after the crash")
        print(console(lab, "n1", "cluster", "duravip", "show"))

        step("revive n2: it rejoins, matures, and 10.1.1.2 fails back (break-before-make)")
        with HolderSampler(lab) as sampler:
            prober = Prober(lab, "10.1.1.2", seconds=6.0).start()
            revive_at = time.time()
            lab.revive("n2")
            wait_converged(lab, VIPS, timeout=20, expect=PREFERRED)
            back = time.time()
            prober.join()
        figures["failback_s"] = round(back - revive_at, 2)
        figures["failback_failed_probes"] = prober.failed()
        figures["double_holder_samples"] = len(sampler.double_holder_samples())
        print(f"  back on n2 after {figures['failback_s']} s; failed probes {figures['failback_failed_probes']}, "
              f"samples with two holders {figures['double_holder_samples']}")

        step("queue handover: sink paused, 5 messages queued for duravip-3 on n3, then n3 stops gracefully")
        lab.pause("sink")
        ids_q = send_mail(lab, "10.1.1.3", subject="queued on n3", headers={"X-Binding": "duravip-3"}, count=5)
        time.sleep(0.5)
        print(console(lab, "n3", "mailq"))
        lab.stop("n3")
        new = wait_converged(lab, VIPS, timeout=10, nodes=["n1", "n2"])
        print(f"  n3 left; 10.1.1.3 now on {new['10.1.1.3']}; its queue:")
        print(console(lab, new["10.1.1.3"], "mailq"))
        lab.resume("sink")
        seen = wait_delivered(lab, ids_q, timeout=60)
        peers = sorted({r["peer_ip"] for i in ids_q for r in seen[i]})
        dups = sum(len(v) - 1 for v in seen.values())
        figures["handover_duplicates"] = dups
        print(f"  all {len(ids_q)} delivered from {', '.join(peers)}, duplicates: {dups}")

        step("n3 comes back")
        lab.start("n3")
        wait_converged(lab, VIPS, timeout=20, expect=PREFERRED)
        print(console(lab, "n1", "cluster", "duravip", "show"))

        step("figures")
        print(json.dumps(figures, indent=2))
        return 0
    finally:
        if args.keep:
            print(f"\nlab '{args.name}' left up; `netns-lab/lab --name {args.name} down` removes it")
        else:
            lab.down()
            print(f"\nlab '{args.name}' torn down")


if __name__ == "__main__":
    sys.exit(main())
