"""The ``duravip`` command: one entry point, one module per subcommand.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``;
they are imported lazily so ``duravip console`` does not pay for trio/pyroute2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from duravip import __version__

#: subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("duravip.daemon.cli", "run the node daemon"),
    "check-config": ("duravip.config.cli", "parse and validate a configuration file"),
    "console": ("duravip.control.console", "talk to a running daemon over its control socket"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duravip",
        description="IP fail-over for mail clusters: SWIM gossip, rendezvous election, netlink, SMTP.",
    )
    parser.add_argument("--version", action="version", version=f"duravip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "_module", None) == "duravip.control.console":
        # A command's own flags (``node drain --wait``) belong to the command words.
        args.words = [*args.words, *extra]
    elif extra:
        parser.error("unrecognized arguments: " + " ".join(extra))
    result: int = importlib.import_module(args._module).run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
