"""The ``lab`` command line (``netns-lab/lab``, ``python -m duravip_lab``); see docs/lab.md.

Its commands and flags are a contract: tests, benchmarks and people's shell
history use them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import SINK_IP, LabError, LabSpec
from .config import render_config
from .lab import Lab


def _groups(text: str) -> list[str]:
    return [m for m in text.split(",") if m]


def build_parser() -> argparse.ArgumentParser:
    name_help = "lab name (default $LAB_NAME or dvl)"
    # Accepted before and after the subcommand; SUPPRESS keeps the subparser from
    # overwriting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", default=argparse.SUPPRESS, help=name_help)
    p = argparse.ArgumentParser(prog="lab", description="duravip netns lab")
    p.add_argument("--name", default=None, help=name_help)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, parents=[common])

    s = add("up", "build namespaces, bridge, configs, keyring; start the sink")
    s.add_argument("--nodes", type=int, default=3)
    s.add_argument("--vips", type=int, default=3)
    s.add_argument("--profile", choices=["fast", "lan", "wan"], default="fast")
    s.add_argument("--quorum", choices=["none", "majority"], default="none")
    s.add_argument("--daemon-cmd", default=None, help='e.g. "CMD {config} {node}"')
    s = add("start", "start daemons (all nodes if none named)")
    s.add_argument("nodes", nargs="*")
    s.add_argument("--daemon-cmd", default=None)
    s = add("stop", "SIGTERM a daemon and wait")
    s.add_argument("node")
    s.add_argument("--timeout", type=float, default=15.0)
    for verb, text in [
        ("kill", "SIGKILL a daemon"),
        ("crash", "SIGKILL a daemon and take its link down"),
        ("revive", "flush DuraVIP addresses, link up, start the daemon"),
        ("pause", "SIGSTOP a daemon"),
        ("resume", "SIGCONT a daemon"),
        ("config", "print the path of a node's config file"),
    ]:
        add(verb, text).add_argument("node")
    s = add("partition", "silently split the bridge between groups like n1 n2,n3")
    s.add_argument("groups", nargs="+")
    s = add("loss", "drop PERCENT of input on eth1 of the nodes (all if none named)")
    s.add_argument("percent", type=int)
    s.add_argument("nodes", nargs="*")
    add("heal", "remove partition and loss rules")
    s = add("exec", "run a command in a namespace: exec NODE -- CMD...")
    s.add_argument("node")
    s.add_argument("command", nargs=argparse.REMAINDER)
    s = add("console", "duravip console against a node's control socket")
    s.add_argument("node")
    s.add_argument("command", nargs=argparse.REMAINDER)
    add("sink-log", "print the messages the sink received, one JSON a line")
    s = add("probe", "connect from the client every interval and read the banner")
    s.add_argument("target", metavar="IP[:PORT]")
    s.add_argument("--interval", type=float, default=0.02)
    s.add_argument("--seconds", type=float, default=5.0)
    s.add_argument("--timeout", type=float, default=0.5)
    s.add_argument("--json", action="store_true")
    s = add("status", "show nodes, processes and held DuraVIPs")
    s.add_argument("--json", action="store_true")
    add("down", "kill what the lab started, delete its namespaces and state")
    s = add("gen-configs", "write the default configs to a directory (no namespaces)")
    s.add_argument("outdir")
    s.add_argument("--nodes", type=int, default=3)
    s.add_argument("--vips", type=int, default=3)
    return p


def _print_status(st: dict[str, Any]) -> None:
    print(
        f"lab {st['name']}  state {st['state_dir']}  profile {st['profile']}  quorum {st['quorum']}"
    )
    for node, n in st["nodes"].items():
        run = f"pid {n['pid']} ({n['state']})" if n["running"] else "stopped"
        link = "" if n["link_up"] else "  LINK DOWN"
        print(f"  {node:4} {n['ip']:12} {run:18} holds {' '.join(n['holds']) or '-'}{link}")
    sink = "running" if st["sink"]["running"] else "NOT RUNNING"
    print(f"  sink {SINK_IP:12} {sink}")
    print(f"  vips: {' '.join(st['vips'])}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    lab = Lab(args.name)
    cmd = args.cmd
    try:
        if cmd == "up":
            lab.up(args.nodes, args.vips, args.profile, args.quorum, args.daemon_cmd)
            print(f"lab {lab.name} up: {lab.spec.nodes} nodes, state {lab.state_dir}")
        elif cmd == "gen-configs":
            out = Path(args.outdir)
            out.mkdir(parents=True, exist_ok=True)
            spec = LabSpec(lab.name, args.nodes, args.vips)
            for i in range(1, args.nodes + 1):
                (out / f"n{i}.conf").write_text(render_config(spec, i, lab.state_dir))
        elif cmd == "down":
            lab.down()
        elif cmd == "start":
            for node, pid in lab.start(*args.nodes, daemon_cmd=args.daemon_cmd).items():
                print(f"{node} started, pid {pid}")
        elif cmd == "stop":
            if not lab.stop(args.node, args.timeout):
                print(f"{args.node} ignored SIGTERM for {args.timeout} s; killed", file=sys.stderr)
                return 1
        elif cmd in ("kill", "crash", "pause", "resume"):
            getattr(lab, cmd)(args.node)
        elif cmd == "revive":
            lab.revive(args.node)
        elif cmd == "config":
            print(lab.config_path(args.node))
        elif cmd == "partition":
            lab.partition(*[_groups(g) for g in args.groups])
        elif cmd == "loss":
            lab.loss(args.percent, *args.nodes)
        elif cmd == "heal":
            lab.heal()
        elif cmd in ("exec", "console"):
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            if cmd == "exec" and not command:
                raise LabError("exec needs a command: lab exec NODE -- CMD...")
            argv2 = command if cmd == "exec" else lab.console_argv(args.node, command)
            return lab.exec(args.node, argv2, capture=False, timeout=None).returncode
        elif cmd == "sink-log":
            for rec in lab.sink_log():
                print(json.dumps(rec))
        elif cmd == "probe":
            ip, _, port = args.target.partition(":")
            recs = lab.probe(ip, int(port or 25), args.interval, args.seconds, args.timeout)
            for r in recs:
                if args.json:
                    print(json.dumps(r))
                else:
                    what = r["node"] if r["ok"] else f"FAIL {r['error']}"
                    print(f"{r['t']:8.3f}  {what}")
            if not args.json:
                ok = sum(r["ok"] for r in recs)
                print(f"{ok}/{len(recs)} ok")
        elif cmd == "status":
            st = lab.status()
            if args.json:
                print(json.dumps(st, indent=1))
            else:
                _print_status(st)
    except LabError as e:
        print(f"lab: {e}", file=sys.stderr)
        return 1
    return 0
