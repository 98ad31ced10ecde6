"""The lab's processes: state dir and configs, daemons and the sink started, stopped, waited for.

Every process the lab starts gets its own process group inside its
namespace and a PID file holding its PID *and* start time, so the lab only
ever signals what it started, even after a PID was recycled.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .base import PKG_DIR, SINK_IP, SINK_IP6, LabError, LabSpec, proc_stat
from .config import render_config
from .topology import Topology


class Cluster(Topology):
    """Processes of one lab, on top of its topology."""

    def __init__(self, name: str | None = None, state_root: Path | str | None = None) -> None:
        super().__init__(name, state_root)
        # Children started by this very process, so they can be reaped (no zombies
        # that would look alive to /proc).
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # --- state dir ---

    def write_state(self, spec: LabSpec) -> None:
        """``lab.json``, a fresh random keyring (0600), one config and spool per node."""
        self.state_dir.mkdir(parents=True)
        (self.state_dir / "lab.json").write_text(json.dumps(asdict(spec), indent=1) + "\n")
        self._spec = spec
        keyring = self.state_dir / "keyring"
        keyring.touch(mode=0o600)
        keyring.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
        for i in range(1, spec.nodes + 1):
            d = self.state_dir / f"n{i}"
            (d / "spool").mkdir(parents=True)
            (d / f"n{i}.conf").write_text(render_config(spec, i, self.state_dir))
        for m in ("client", "sink"):
            (self.state_dir / m).mkdir()

    # --- processes ---

    def _pidfile(self, member: str) -> Path:
        return self.state_dir / member / "pid"

    def pid(self, member: str) -> int | None:
        """PID of the member's recorded process if it still runs (not a zombie)."""
        try:
            pid_s, start_s = self._pidfile(member).read_text().split()
        except (FileNotFoundError, ValueError):
            return None
        pid = int(pid_s)
        child = self._children.get(pid)
        if child is not None and child.poll() is not None:
            del self._children[pid]
            return None
        st = proc_stat(pid)
        if st is None or st[1] != int(start_s) or st[0] in "ZX":
            return None
        return pid

    def running(self, member: str) -> bool:
        return self.pid(member) is not None

    def proc_state(self, member: str) -> str | None:
        """Kernel state letter of the member's process (``S``, ``R``, ``T``...), or None."""
        pid = self.pid(member)
        st = proc_stat(pid) if pid is not None else None
        return st[0] if st else None

    def _spawn(self, member: str, argv: Sequence[str]) -> int:
        log = self.log_path(member)
        with open(log, "ab") as out:
            child = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(member), *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir / member,
                start_new_session=True,  # own process group: signals reach its children too
                # Belt and braces: the daemon's plumber refuses the root namespace.
                env={**os.environ, "DURAVIP_REQUIRE_NETNS": "1"},
            )
        st = proc_stat(child.pid)
        if st is None:  # exited already; keep a pidfile that can never match
            st = ("X", -1)
        self._pidfile(member).write_text(f"{child.pid} {st[1]}\n")
        self._children[child.pid] = child
        return child.pid

    def _signal_group(self, member: str, sig: int) -> bool:
        pid = self.pid(member)
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        return True

    def _wait_gone(self, member: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.running(member):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def _kill(self, member: str) -> None:
        """SIGKILL the member's whole process group and wait until it is gone."""
        self._signal_group(member, signal.SIGKILL)
        if not self._wait_gone(member, 5.0):
            raise LabError(f"{member} survived SIGKILL for 5 s")

    def kill_all(self) -> None:
        """SIGKILL every process with a PID file in the state dir (only those), then wait."""
        members = [p.parent.name for p in self.state_dir.glob("*/pid")]
        for m in members:
            self._signal_group(m, signal.SIGKILL)
        for m in members:
            self._wait_gone(m, 5.0)

    # --- the sink ---

    def start_sink(self) -> None:
        """Start the recording smarthost in ``<name>-sink`` and wait until it listens."""
        ready = self.state_dir / "sink" / "ready"
        argv = [
            self.spec.python, str(PKG_DIR / "sink.py"),
            "--listen", f"{SINK_IP}:25",
            "--listen", f"[{SINK_IP6}]:25",
            "--log", str(self.sink_log_path),
            "--ready", str(ready),
        ]  # fmt: skip
        self._spawn("sink", argv)
        deadline = time.monotonic() + 10
        while not ready.exists():
            if not self.running("sink"):
                raise LabError(f"sink died at start; see {self.log_path('sink')}")
            if time.monotonic() > deadline:
                raise LabError("sink did not become ready in 10 s")
            time.sleep(0.01)

    def sink_log(self) -> list[dict[str, Any]]:
        """Every message the sink recorded, oldest first."""
        try:
            text = self.sink_log_path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    # --- the daemons ---

    def daemon_argv(self, node: str, daemon_cmd: str | None = None) -> list[str]:
        """The command ``start`` runs for ``node``.

        Precedence: the argument, then ``up --daemon-cmd``, then ``$LAB_DAEMON_CMD``,
        then ``<python> -m duravip run -c <config> --log-json``. Placeholders
        ``{config} {node} {ip} {python} {dir}`` are substituted per word.
        """
        cmd = daemon_cmd or self.spec.daemon_cmd or os.environ.get("LAB_DAEMON_CMD")
        subs = {
            "{config}": str(self.config_path(node)),
            "{node}": node,
            "{ip}": self.ip(node),
            "{python}": self.spec.python,
            "{dir}": str(self.state_dir / node),
        }
        if not cmd:
            return [self.spec.python, "-m", "duravip", "run", "-c", subs["{config}"], "--log-json"]
        words = shlex.split(cmd)
        for key, val in subs.items():
            words = [w.replace(key, val) for w in words]
        return words

    def start(self, *nodes: str, daemon_cmd: str | None = None) -> dict[str, int]:
        """Start the daemon on ``nodes`` (all if none); already running ones are left alone."""
        started = {}
        for node in nodes or self.nodes:
            self._node(node)
            if self.running(node):
                continue
            started[node] = self._spawn(node, self.daemon_argv(node, daemon_cmd))
        return started

    def stop(self, node: str, timeout: float = 15.0) -> bool:
        """SIGTERM (graceful leave) and wait; SIGKILL the group if it overstays. True if clean."""
        self._node(node)
        pid = self.pid(node)
        if pid is None:
            return True
        os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGCONT)  # a paused daemon must run to leave gracefully
        if self._wait_gone(node, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # stragglers of its group
            return True
        self._kill(node)
        return False

    def console_argv(self, node: str, command: Sequence[str]) -> list[str]:
        return [
            self.spec.python, "-m", "duravip", "console",
            "-s", str(self.control_socket(node)), *command,
        ]  # fmt: skip

    def console(
        self, node: str, *command: str, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        return self.exec(node, self.console_argv(node, command), timeout=timeout)
