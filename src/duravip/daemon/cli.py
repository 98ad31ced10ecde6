"""``duravip run``: load the config, set up logging, run the node until told to stop."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

DEFAULT_CONFIG = "/etc/duravip/duravip.conf"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="configuration file")
    parser.add_argument(
        "--foreground", action="store_true", help="stay in the foreground (always true; for systemd)"
    )
    parser.add_argument("--log-json", action="store_true", help="log one JSON object a line")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def run(args: argparse.Namespace) -> int:
    import trio

    from duravip import config as cfg
    from duravip import logs
    from duravip.daemon.node import run_node

    path = Path(args.config)
    try:
        config = cfg.load(path)
    except cfg.ConfigError as e:
        for d in e.diagnostics:
            print(d, file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{path}: cannot read: {e.strerror}", file=sys.stderr)
        return 1
    logs.setup(
        config.cluster.node_name,
        as_json=args.log_json,
        level=logging.DEBUG if args.verbose else logging.INFO,
    )
    return trio.run(run_node, config, path)
