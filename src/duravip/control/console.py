"""``duravip console``: one command or an interactive prompt over the control socket.

Blocking sockets on purpose: the console is a short-lived client, and not
importing trio keeps it quick to start.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shlex
import socket
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from duravip.control.protocol import (
    MAX_RESPONSE_LINE,
    LineBuffer,
    ProtocolError,
    Request,
    Response,
)

DEFAULT_SOCKET = Path("/run/duravip/control.sock")
HISTORY_FILE = "~/.duravip_history"
PROMPT = "duravip> "
#: Exit codes: command failed, socket unreachable / bad invocation.
EXIT_FAILED = 1
EXIT_UNREACHABLE = 2


class Unreachable(Exception):
    """The daemon's socket cannot be reached (message names the path)."""


class ControlClient:
    """One connection to the control socket; requests are answered in order."""

    def __init__(self, path: Path, timeout: float | None = 60.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = LineBuffer(MAX_RESPONSE_LINE)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(os.fspath(self.path))
        except FileNotFoundError as e:
            sock.close()
            raise Unreachable(f"no control socket at {self.path} (is the daemon running?)") from e
        except ConnectionRefusedError as e:
            sock.close()
            raise Unreachable(f"nothing listening on {self.path} (stale socket?)") from e
        except OSError as e:
            sock.close()
            raise Unreachable(f"cannot connect to {self.path}: {e.strerror or e}") from e
        self._sock = sock
        self._buf = LineBuffer(MAX_RESPONSE_LINE)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> ControlClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, words: Sequence[str], as_json: bool = False) -> Response:
        """Send one command and wait for its response line.

        A connection the daemon closed while idle (restart) is re-opened once,
        but only when the send itself failed, so no command ever runs twice.
        """
        line = Request(words=tuple(words), json=as_json).to_line()
        if self._sock is None:
            self.connect()
        try:
            try:
                self._send(line)
            except (BrokenPipeError, ConnectionResetError):
                queued = self._queued_response()
                self.close()
                if queued is not None:
                    return queued  # e.g. a refusal sent before our request arrived
                self.connect()
                self._send(line)
            return self._receive()
        except TimeoutError as e:
            self.close()
            raise Unreachable(f"no answer from {self.path} within {self.timeout}s") from e
        except (BrokenPipeError, ConnectionResetError) as e:
            self.close()
            raise Unreachable(f"daemon closed the connection on {self.path}") from e
        except (ProtocolError, Unreachable):
            self.close()
            raise

    def _send(self, line: bytes) -> None:
        assert self._sock is not None
        self._sock.sendall(line)

    def _queued_response(self) -> Response | None:
        """An answer the daemon sent before it closed this connection, if one waits.

        Answers are always read in order, so on a failed send the only line that
        can be waiting is one the daemon volunteered: its refusal of this peer.
        """
        assert self._sock is not None
        try:
            while True:
                chunk = self._sock.recv(1 << 20, socket.MSG_DONTWAIT)
                if not chunk:
                    return None
                lines = self._buf.feed(chunk)
                if lines:
                    return Response.from_line(lines[0])
        except OSError:  # nothing waiting (EAGAIN), or reset after the last byte
            return None

    def _receive(self) -> Response:
        assert self._sock is not None
        while True:
            chunk = self._sock.recv(1 << 20)
            if not chunk:
                raise Unreachable(f"daemon closed the connection on {self.path}")
            lines = self._buf.feed(chunk)
            if lines:
                return Response.from_line(lines[0])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-s", "--socket", type=Path, default=None,
                        help=f"control socket path (default {DEFAULT_SOCKET})")
    parser.add_argument("-c", "--config", type=Path, default=None,
                        help="read the control socket path from this configuration file")
    parser.add_argument("--json", action="store_true",
                        help="print the reply's data as JSON instead of the text table")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for an answer (default 60)")
    parser.add_argument("words", nargs="*", metavar="COMMAND",
                        help="command to run, e.g. 'cluster duravip show'; "
                             "no command: interactive prompt")


def socket_path(args: argparse.Namespace) -> Path:
    """``-s`` wins, then ``-c CONFIG``'s control listener, then the default."""
    if args.socket is not None:
        return Path(args.socket)
    if args.config is not None:
        try:
            config_mod = importlib.import_module("duravip.config")
            load: Callable[[Path], Any] = config_mod.load
        except (ImportError, AttributeError) as e:
            raise Unreachable(f"cannot read {args.config}: config loader unavailable ({e})") from e
        try:
            config = load(Path(args.config))
        except (OSError, ValueError) as e:
            raise Unreachable(f"cannot read {args.config}: {e}") from e
        return Path(config.control.path)
    return DEFAULT_SOCKET


def print_response(resp: Response, as_json: bool, out: TextIO, err: TextIO) -> int:
    """Print one response the way the console shows it; return the exit code."""
    if not resp.ok:
        print(f"error: {resp.error}", file=err)
        return EXIT_FAILED
    if as_json:
        print(json.dumps(resp.data, indent=2, sort_keys=False), file=out)
    elif resp.text:
        print(resp.text.rstrip("\n"), file=out)
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        path = socket_path(args)
    except Unreachable as e:
        print(f"duravip console: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.words:
        return one_shot(path, args.words, args.json, args.timeout)
    return interactive(path, args.json, args.timeout)


def one_shot(path: Path, words: Sequence[str], as_json: bool, timeout: float | None,
             out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        with ControlClient(path, timeout) as client:
            resp = client.request(words, as_json)
    except Unreachable as e:
        print(f"duravip console: {e}", file=err)
        return EXIT_UNREACHABLE
    except ProtocolError as e:
        print(f"duravip console: bad answer from {path}: {e}", file=err)
        return EXIT_UNREACHABLE
    return print_response(resp, as_json, out, err)


def complete_words(commands: Iterable[Sequence[str]], typed: Sequence[str],
                   prefix: str) -> list[str]:
    """Candidates for the word being typed, given the complete words before it."""
    n = len(typed)
    low = [w.lower() for w in typed]
    found: set[str] = set()
    for cmd in commands:
        if len(cmd) > n and [w.lower() for w in cmd[:n]] == low \
                and cmd[n].lower().startswith(prefix.lower()):
            found.add(cmd[n])
    return sorted(found)


def _command_words(client: ControlClient) -> list[tuple[str, ...]]:
    """The server's command list (from ``help``), for completion."""
    try:
        resp = client.request(["help"], as_json=True)
    except (Unreachable, ProtocolError):
        return []
    if not resp.ok or not isinstance(resp.data, list):
        return []
    words = [tuple(str(d.get("command", "")).split()) for d in resp.data if isinstance(d, dict)]
    return [*words, ("quit",), ("exit",)]


def _setup_readline(commands: list[tuple[str, ...]]) -> Callable[[], None]:
    """History and completion when ``readline`` exists; returns the save-history hook."""
    try:
        import readline
    except ImportError:
        return lambda: None
    history = Path(os.path.expanduser(HISTORY_FILE))
    with contextlib.suppress(OSError):
        readline.read_history_file(history)
    readline.set_history_length(1000)

    def completer(text: str, state: int) -> str | None:
        line = readline.get_line_buffer()[: readline.get_begidx()]
        try:
            typed = shlex.split(line)
        except ValueError:
            return None
        options = complete_words(commands, typed, text)
        return options[state] + " " if state < len(options) else None

    readline.set_completer_delims(" \t")
    readline.set_completer(completer)
    readline.parse_and_bind("tab: complete")

    def save() -> None:
        try:
            readline.write_history_file(history)
        except OSError as e:
            print(f"duravip console: cannot save history to {history}: {e}", file=sys.stderr)

    return save


def interactive(path: Path, as_json: bool, timeout: float | None) -> int:
    """Prompt loop until ``quit``, ``exit`` or EOF; returns the last command's code."""
    client = ControlClient(path, timeout)
    try:
        client.connect()
    except Unreachable as e:
        print(f"duravip console: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    save_history = _setup_readline(_command_words(client))
    prompt = PROMPT if sys.stdin.isatty() else ""  # no prompts in piped output
    last = 0
    try:
        while True:
            try:
                line = input(prompt)
            except EOFError:
                if prompt:
                    print()
                break
            except KeyboardInterrupt:
                print()
                continue
            try:
                words = shlex.split(line)
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                continue
            if not words:
                continue
            if words[0].lower() in ("quit", "exit") and len(words) == 1:
                break
            last = _interactive_command(client, words, as_json)
    finally:
        save_history()
        client.close()
    return last


def _interactive_command(client: ControlClient, words: list[str], as_json: bool) -> int:
    try:
        resp = client.request(words, as_json)
    except Unreachable as e:
        print(f"duravip console: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ProtocolError as e:
        print(f"duravip console: bad answer: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        client.close()  # the answer still in flight belongs to an abandoned request
        print()
        return EXIT_FAILED
    return print_response(resp, as_json, sys.stdout, sys.stderr)
