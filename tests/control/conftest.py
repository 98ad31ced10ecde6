"""Fixtures for the control tests: short socket paths and a server in a thread."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from duravip.control.protocol import CommandError, CommandRegistry, Reply
from duravip.control.server import serve


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory: ``sun_path`` is limited to 108 bytes, pytest's tmp_path is long."""
    d = Path(tempfile.mkdtemp(prefix="dvc-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def sample_registry() -> CommandRegistry:
    """A registry shaped like the daemon's, with canned answers."""
    r = CommandRegistry()

    async def show(args: list[str]) -> Reply:
        return Reply(text="IP        owner\n10.1.1.1  n1",
                     data=[{"ip": "10.1.1.1", "owner": "n1"}])

    async def explain(args: list[str]) -> Reply:
        if len(args) != 1:
            raise CommandError("usage: cluster duravip explain IP")
        if args[0] != "10.1.1.1":
            raise CommandError(f"{args[0]} is not a DuraVIP")
        return Reply(text=f"{args[0]}: owner n1 (preference)", data={"ip": args[0], "owner": "n1"})

    async def info(args: list[str]) -> Reply:
        return Reply(text="cluster mta-east, node n1", data={"cluster": "mta-east", "node": "n1"})

    r.add("cluster duravip show", show, "list DuraVIPs")
    r.add("cluster duravip explain", explain, "why an IP is where it is",
          "cluster duravip explain IP")
    r.add("cluster info", info, "this node and its cluster")
    return r


class ServerThread:
    """Runs the Trio control server in its own thread, for blocking clients."""

    def __init__(self, path: Path, registry: CommandRegistry, mode: int = 0o600) -> None:
        self.path = path
        self.registry = registry
        self.mode = mode
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as scope:
                self._scope = scope
                async with trio.open_nursery() as n:
                    await n.start(lambda task_status: serve(
                        path=self.path, mode=self.mode, registry=self.registry,
                        task_status=task_status))
                    self._ready.set()

        try:
            trio.run(main)
        except BaseException as e:
            self.error = e  # reported to the test in __enter__/__exit__
            raise
        finally:
            self._ready.set()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(10), "server thread did not start"
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None and self._scope is not None:
            scope = self._scope
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(scope.cancel, trio_token=self._token)
        self._thread.join(10)
        assert not self._thread.is_alive(), "server thread did not stop"
        if self.error is not None:
            raise self.error
