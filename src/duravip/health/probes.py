"""The built-in probes (Trio): each returns ``(ok, detail)`` within its timeout.

They never block the daemon: the file system probe runs in a worker thread
that is abandoned on timeout, scripts are separate processes killed on
timeout, and the SMTP probe is an ordinary non-blocking connection.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Sequence
from pathlib import Path

import trio

from duravip.config import HostPort

__all__ = ["probe_script", "probe_smtp", "probe_spool"]

Result = tuple[bool, str]


async def probe_smtp(targets: Sequence[HostPort], timeout: float) -> Result:
    """Connect to the first target (one of our own listeners) and read a ``220`` banner."""
    if not targets:
        return True, "no SMTP listener held here to check"
    target = targets[0]
    with trio.move_on_after(timeout):
        try:
            stream = await trio.open_tcp_stream(str(target.host), target.port)
        except OSError as exc:
            return False, f"{target}: connect failed: {exc.strerror or exc}"
        async with stream:
            got = b""
            while b"\n" not in got and len(got) < 512:
                chunk = await stream.receive_some(512)
                if not chunk:
                    break
                got += chunk
            if got.startswith(b"220"):
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(b"QUIT\r\n")  # polite: a clean end in its logs
        if got.startswith(b"220"):
            return True, f"{target}: banner"
        if got.startswith(b"421"):
            # At its session cap the listener still answers: alive, only busy. A
            # client flood must not make a node demote itself (and the next one).
            return True, f"{target}: busy (421), counted as alive"
        return False, f"{target}: no 220 banner ({got[:40]!r})"
    return False, f"{target}: no banner within {timeout}s"


def _spool_write(path: Path, min_free: int) -> Result:
    probe = path / f".duravip-health-{secrets.token_hex(6)}"  # several checks may run at once
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b"duravip health probe\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.unlink(probe)
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    if free < min_free:
        return False, f"{path}: {free} bytes free, below min_free {min_free}"
    return True, f"{path}: durable write ok, {free} bytes free"


async def probe_spool(path: Path, min_free: int, timeout: float) -> Result:
    """A durable test write (fsync) in the spool directory, and free space above ``min_free``."""
    with trio.move_on_after(timeout):
        try:
            return await trio.to_thread.run_sync(
                _spool_write, path, min_free, abandon_on_cancel=True
            )
        except OSError as exc:
            return False, f"{path}: {exc.strerror or exc}"
    return False, f"{path}: test write took over {timeout}s"


async def probe_script(path: Path, timeout: float) -> Result:
    """Run ``path`` (exit 0 = healthy); killed when it runs past ``timeout``."""
    with trio.move_on_after(timeout):
        try:
            proc = await trio.run_process(
                [str(path)],
                check=False,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except OSError as exc:
            return False, f"{path}: {exc.strerror or exc}"
        if proc.returncode == 0:
            return True, f"{path}: exit 0"
        return False, f"{path}: exit {proc.returncode}"
    return False, f"{path}: still running after {timeout}s (killed)"
