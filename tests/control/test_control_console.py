"""``duravip console`` against a real control server running in a thread (or a pty)."""

from __future__ import annotations

import argparse
import json
import os
import pty
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import duravip.config
from duravip.control import console
from duravip.control.console import ControlClient, Unreachable, complete_words
from duravip.control.protocol import Response

from .conftest import ServerThread, sample_registry


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="duravip console")
    console.add_arguments(p)
    return p.parse_args(argv)


def test_one_shot_text(sockdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = sockdir / "c.sock"
    with ServerThread(path, sample_registry()):
        rc = console.run(parse("-s", str(path), "cluster", "duravip", "show"))
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    assert out == "IP        owner\n10.1.1.1  n1\n"


def test_one_shot_json(sockdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = sockdir / "c.sock"
    with ServerThread(path, sample_registry()):
        rc = console.run(parse("-s", str(path), "--json", "cluster", "duravip", "explain",
                               "10.1.1.1"))
    out, _ = capsys.readouterr()
    assert rc == 0
    assert json.loads(out) == {"ip": "10.1.1.1", "owner": "n1"}


def test_one_shot_error_exit_1(sockdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = sockdir / "c.sock"
    with ServerThread(path, sample_registry()):
        rc = console.run(parse("-s", str(path), "cluster", "duravip", "explain", "10.9.9.9"))
        rc_unknown = console.run(parse("-s", str(path), "frobnicate"))
    out, err = capsys.readouterr()
    assert (rc, rc_unknown) == (1, 1)
    assert out == ""
    assert "error: 10.9.9.9 is not a DuraVIP" in err and "unknown command 'frobnicate'" in err


def test_unreachable_exit_2_names_path(sockdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = sockdir / "nope.sock"
    assert console.run(parse("-s", str(missing), "cluster", "info")) == 2
    assert str(missing) in capsys.readouterr().err
    # a regular file where the socket should be
    notsock = sockdir / "file"
    notsock.write_text("")
    assert console.run(parse("-s", str(notsock), "cluster", "info")) == 2
    assert str(notsock) in capsys.readouterr().err


def test_socket_path_from_config(sockdir: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = sockdir / "from-config.sock"
    seen: list[Path] = []

    class FakeControl:
        def __init__(self, p: Path) -> None:
            self.path = p

    class FakeConfig:
        control = FakeControl(path)

    def fake_load(p: Path) -> FakeConfig:
        seen.append(p)
        return FakeConfig()

    monkeypatch.setattr(duravip.config, "load", fake_load, raising=False)
    with ServerThread(path, sample_registry()):
        rc = console.run(parse("-c", "/etc/duravip/x.conf", "cluster", "info"))
    assert rc == 0 and seen == [Path("/etc/duravip/x.conf")]
    assert capsys.readouterr().out == "cluster mta-east, node n1\n"
    # -s wins over -c
    assert console.socket_path(parse("-s", "/x.sock", "-c", "/y.conf")) == Path("/x.sock")
    assert console.socket_path(parse()) == Path("/run/duravip/control.sock")


def test_config_loader_missing_or_failing(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delattr(duravip.config, "load", raising=False)
    assert console.run(parse("-c", "/nonexistent.conf", "help")) == 2
    assert "/nonexistent.conf" in capsys.readouterr().err

    def broken(p: Path) -> None:
        raise OSError(2, "No such file or directory")

    monkeypatch.setattr(duravip.config, "load", broken, raising=False)
    assert console.run(parse("-c", "/nonexistent.conf", "help")) == 2
    assert "No such file" in capsys.readouterr().err


def test_client_reconnects_after_server_restart(sockdir: Path) -> None:
    path = sockdir / "c.sock"
    client = ControlClient(path, timeout=5)
    try:
        with ServerThread(path, sample_registry()):
            assert client.request(["cluster", "info"]).ok
            first = client._sock
        # restarted daemon: the idle connection is dead, the send fails, one reconnect
        with ServerThread(path, sample_registry()):
            assert client.request(["cluster", "info"]).data == {"cluster": "mta-east", "node": "n1"}
            assert client._sock is not first
        with pytest.raises(Unreachable, match=str(path)):
            client.request(["cluster", "info"])
    finally:
        client.close()


def test_refusal_queued_before_the_send_failed_is_shown(sockdir: Path) -> None:
    """A daemon that refuses the peer answers and closes at once, often before the
    console's first send: that send fails, but the refusal is waiting and must be
    shown, not replaced by a reconnect and 'daemon closed the connection'."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    refusal = Response(ok=False, error="permission denied: uid 1000 is not allowed")
    b.sendall(refusal.to_line())
    b.close()
    client = ControlClient(sockdir / "nothing-here.sock", timeout=5)
    client._sock = a
    try:
        assert client.request(["cluster", "info"]) == refusal
        assert client._sock is None
    finally:
        client.close()


def test_complete_words() -> None:
    cmds = [("cluster", "duravip", "show"), ("cluster", "duravip", "show", "tables"),
            ("cluster", "info"), ("cluster", "membership"), ("mailq",), ("help",)]
    assert complete_words(cmds, [], "") == ["cluster", "help", "mailq"]
    assert complete_words(cmds, [], "m") == ["mailq"]
    assert complete_words(cmds, ["cluster"], "") == ["duravip", "info", "membership"]
    assert complete_words(cmds, ["CLUSTER"], "D") == ["duravip"]
    assert complete_words(cmds, ["cluster", "duravip", "show"], "") == ["tables"]
    assert complete_words(cmds, ["mailq"], "") == []


def _read_until(fd: int, needle: bytes, timeout: float = 10.0) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while needle not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {needle!r}; got {buf!r}")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the pty
                break
            if not chunk:
                break
            buf += chunk
    return buf


CONSOLE_MAIN = (
    "import argparse, sys; from duravip.control import console; "
    "p = argparse.ArgumentParser(); console.add_arguments(p); "
    "sys.exit(console.run(p.parse_args(sys.argv[1:])))"
)


def test_interactive_through_a_pty(sockdir: Path) -> None:
    path = sockdir / "c.sock"
    home = sockdir / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "TERM": "dumb"}
    with ServerThread(path, sample_registry()):
        master, slave = pty.openpty()
        proc = subprocess.Popen([sys.executable, "-c", CONSOLE_MAIN, "-s", str(path)],
                                stdin=slave, stdout=slave, stderr=slave, env=env,
                                close_fds=True)
        os.close(slave)
        try:
            _read_until(master, b"duravip> ")
            os.write(master, b"cluster info\r")
            out = _read_until(master, b"duravip> ")
            assert b"cluster mta-east, node n1" in out
            # tab completion of command words from the server's help data
            os.write(master, b"cluster dura\t")
            assert b"duravip " in _read_until(master, b"duravip ")
            os.write(master, b"explain 10.9.9.9\r")
            out = _read_until(master, b"duravip> ")
            assert b"error: 10.9.9.9 is not a DuraVIP" in out
            os.write(master, b"quit\r")
            assert proc.wait(timeout=10) == 1  # the last command failed
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            os.close(master)
    history = (home / ".duravip_history").read_text()
    assert "cluster info" in history and "cluster duravip explain 10.9.9.9" in history


def test_interactive_eof_exits_0(sockdir: Path) -> None:
    path = sockdir / "c.sock"
    env = {**os.environ, "HOME": str(sockdir)}
    with ServerThread(path, sample_registry()):
        done = subprocess.run([sys.executable, "-c", CONSOLE_MAIN, "-s", str(path)],
                              input="cluster info\n", capture_output=True, text=True,
                              env=env, timeout=20)
    assert done.returncode == 0
    assert "cluster mta-east, node n1" in done.stdout


def test_duravip_cli_entry_point(sockdir: Path) -> None:
    """Through the installed ``duravip`` script, once every subcommand module imports."""
    pytest.importorskip("duravip.daemon.cli")
    pytest.importorskip("duravip.config.cli")
    exe = Path(sys.executable).parent / "duravip"
    path = sockdir / "c.sock"
    with ServerThread(path, sample_registry()):
        done = subprocess.run([str(exe), "console", "-s", str(path), "--json", "cluster", "info"],
                              capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"cluster": "mta-east", "node": "n1"}
