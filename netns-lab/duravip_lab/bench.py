"""What the lab benchmarks share (bench-failover, bench-scale, chaos), and their helpers.

Why one module: the scripts drive the same netns lab, need the same
percentiles, the same safe set-up/tear-down, and the same helper processes
that must run *inside* a namespace. Those helpers are subcommands of this very
module so a lab can launch them with ``ip netns exec``:

    python -m duravip_lab.bench keepalived-node NODE DIR   keepalived + SMTP banner stand-in
    python -m duravip_lab.bench inject ...                 send mail at a fixed rate, JSON lines
    python -m duravip_lab.bench probe-many ...             probe several VIPs at once, JSON lines

Standard library only, so the helpers start fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .base import PKG_DIR
from .lab import Lab
from .probe import attempt

#: ``python -m`` names of this module, for the commands a lab runs in a namespace.
MODULE = "duravip_lab.bench"


# --- numbers -----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = max(1, math.ceil(q / 100.0 * len(s)))
    return s[k - 1]


def summary(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/max in ms, rounded to 0.1 ms."""
    out: dict[str, float | None] = {}
    for key, q in (("p50_ms", 50.0), ("p90_ms", 90.0), ("max_ms", 100.0)):
        v = percentile(values, q)
        out[key] = None if v is None else round(v, 1)
    return out


def outages(records: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """(start ts, duration ms) of every run of failed probes, ended by the next good one.

    A run still open at the end lasts until the last record.
    """
    out: list[tuple[float, float]] = []
    start: float | None = None
    for r in records:
        if not r["ok"]:
            if start is None:
                start = float(r["ts"])
        elif start is not None:
            out.append((start, (float(r["ts"]) - start) * 1000.0))
            start = None
    if start is not None and records:
        out.append((start, (float(records[-1]["ts"]) - start) * 1000.0))
    return out


# --- lab life cycle ----------------------------------------------------------------------------


def lab_name(prefix: str) -> str:
    """A lab name unique to this process: ``<prefix><pid % 100>``."""
    return f"{prefix}{os.getpid() % 100}"


class _Terminated(Exception):
    """SIGTERM arrived: unwind so every ``finally`` tears its lab down."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated(f"signal {signum}")


@contextlib.contextmanager
def lab_session(name: str, **up: Any) -> Iterator[Lab]:
    """``Lab(name).up(**up)``, yielded; always ``down`` afterwards, also on SIGTERM/Ctrl-C."""
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    lab = Lab(name)
    if lab.exists():  # a leftover of an earlier run of ours with the same pid slot
        lab.down()
    try:
        lab.up(**up)
        yield lab
    finally:
        try:
            lab.down()
        finally:
            signal.signal(signal.SIGTERM, old)


#: A busy loop that ends by itself after ``argv[1]`` seconds (a bound if we die unkilled).
_BUSY = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"


@contextlib.contextmanager
def cpu_load(n: int, bound_s: float) -> Iterator[list[int]]:
    """``n`` busy-loop processes on the host while the block runs (their PIDs yielded).

    Each exits by itself after ``bound_s``; all are killed by PID on the way out.
    They run in the root namespace but touch no network: CPU only.
    """
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(max(0, n)):
            procs.append(
                subprocess.Popen([sys.executable, "-c", _BUSY, f"{bound_s:g}"], close_fds=True)
            )
        if procs:
            log(f"cpu load: {n} busy loops, pids {[p.pid for p in procs]}")
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- keepalived in a lab node ------------------------------------------------------------------


def keepalived_conf(node: str, priority: int, vip: str, advert_int: float, vrid: int = 51) -> str:
    """One VRRPv3 instance for ``vip`` on eth1 (v3: sub-second ``advert_int`` needs it)."""
    return f"""# written by duravip_lab.bench for the duravip failover comparison
global_defs {{
  router_id {node}
  vrrp_version 3
  vrrp_garp_master_delay 1
  vrrp_garp_master_repeat 3
  enable_script_security
}}
vrrp_instance VI_1 {{
  state BACKUP
  interface eth1
  virtual_router_id {vrid}
  priority {priority}
  advert_int {advert_int:g}
  virtual_ipaddress {{
    {vip}/32 dev eth1
  }}
}}
"""


def write_keepalived_configs(lab: Lab, vip: str, master: str, advert_int: float) -> None:
    """keepalived.conf in every node dir; ``master`` gets the highest priority (preempts)."""
    for i, node in enumerate(lab.nodes):
        prio = 200 if node == master else 100 - i
        (lab.state_dir / node / "keepalived.conf").write_text(
            keepalived_conf(node, prio, vip, advert_int)
        )


def keepalived_daemon_cmd() -> str:
    """``lab up --daemon-cmd`` template that runs :func:`keepalived_node` in each node."""
    return f"{{python}} -m {MODULE} keepalived-node {{node}} {{dir}}"


def keepalived_node(node: str, d: Path) -> int:
    """keepalived (foreground) + the banner stand-in, in this process's group.

    ``lab kill/crash/pause`` signal the whole group and so hit both. ``lab stop``
    signals only this process: we pass SIGTERM to keepalived (it sends priority
    0 and drops the VIP, its graceful leave), then stop the stand-in.
    """
    ka = subprocess.Popen(
        [
            "keepalived",
            "-n",
            "-l",
            "-D",
            "-P",
            "-f",
            str(d / "keepalived.conf"),
            "-p",
            str(d / "keepalived.pid"),
            "-r",
            str(d / "vrrp.pid"),
            "-c",
            str(d / "chk.pid"),
        ]
    )
    sa = subprocess.Popen([sys.executable, str(PKG_DIR / "standin.py"), node])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.is_set() and ka.poll() is None and sa.poll() is None:
        stop.wait(0.2)
    ka.terminate()
    try:
        ka.wait(10)
    except subprocess.TimeoutExpired:
        ka.kill()
        ka.wait(5)
    sa.terminate()
    try:
        sa.wait(5)
    except subprocess.TimeoutExpired:
        sa.kill()
        sa.wait(5)
    print(f"keepalived-node {node}: stopped", flush=True)
    return 0


# --- mail injection from the client namespace ---------------------------------------------------


def inject(
    targets: list[tuple[str, str]], rate: float, seconds: float, timeout: float, prefix: str
) -> int:
    """Send one message per connection, ``rate`` a second, round-robin over (ip, X-Binding).

    Prints one JSON line per try; ``ok`` only when sendmail returned without error
    (the message is then acknowledged). Bounded by ``seconds`` and so by count.
    Sends from a small pool of threads so one black-holed VIP doesn't stall the rest.
    """
    import email.utils
    import smtplib
    from concurrent.futures import ThreadPoolExecutor

    out_lock = threading.Lock()

    def one(k: int, ip: str, binding: str) -> None:
        mid = email.utils.make_msgid(idstring=f"{prefix}.{k}", domain="chaos.lab")
        hdr = f"X-Binding: {binding}\r\n" if binding else ""
        msg = (
            f"From: chaos@example.org\r\nTo: user@example.net\r\nSubject: chaos {k}\r\n"
            f"Message-ID: {mid}\r\n{hdr}\r\nchaos message {k}\r\n"
        )
        t = time.time()
        rec: dict[str, Any] = {"k": k, "mid": mid, "ip": ip, "binding": binding, "ts": t}
        try:
            with smtplib.SMTP(ip, 25, timeout=timeout) as s:
                s.sendmail("chaos@example.org", ["user@example.net"], msg)
            rec.update(ok=True, error=None)
        except (OSError, smtplib.SMTPException) as e:
            rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:200])
        rec["ms"] = round((time.time() - t) * 1000, 1)
        with out_lock:
            print(json.dumps(rec), flush=True)

    total = int(rate * seconds)
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=32) as pool:
        for k in range(total):
            slot = start + k / rate
            now = time.monotonic()
            if slot > now:
                time.sleep(slot - now)
            ip, binding = targets[k % len(targets)]
            pool.submit(one, k, ip, binding)
    return 0


# --- probing several VIPs from the client namespace ----------------------------------------------


def probe_many(ips: list[str], interval: float, seconds: float, timeout: float) -> int:
    """One thread per VIP, each like ``duravip_lab.probe``; JSON lines with ``ip`` added."""
    lock = threading.Lock()
    start = time.monotonic()

    def run(ip: str) -> None:
        for k in range(int(seconds / interval) + 1):
            slot = start + k * interval
            now = time.monotonic()
            if now - start >= seconds:
                return
            if slot > now:
                time.sleep(slot - now)
            elif now - slot > interval:
                continue
            rec = {"ip": ip, "ts": time.time(), **attempt(ip, 25, timeout)}
            with lock:
                print(json.dumps(rec), flush=True)

    threads = [threading.Thread(target=run, args=(ip,), daemon=True) for ip in ips]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout + 5)
    return 0


class Background:
    """A helper subcommand of this file running in a lab namespace; JSON lines collected."""

    def __init__(self, lab: Lab, member: str, args: Sequence[str], limit_s: float) -> None:
        argv = [
            "ip",
            "netns",
            "exec",
            lab.ns(member),
            lab.spec.python,
            "-m",
            MODULE,
            *args,
        ]
        self.limit_s = limit_s
        self.records: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(json.JSONDecodeError):
                self.records.append(json.loads(line))

    def wait(self) -> list[dict[str, Any]]:
        """Wait for the helper (bounded by ``limit_s`` + slack), killing it if it overstays."""
        try:
            self.proc.wait(self.limit_s + 30)
        except subprocess.TimeoutExpired:
            self.stop()
        self._thread.join(10)
        return self.records

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("keepalived-node")
    s.add_argument("node")
    s.add_argument("dir", type=Path)
    s = sub.add_parser("inject")
    s.add_argument("--target", action="append", default=[], help="IP or IP/X-Binding")
    s.add_argument("--rate", type=float, default=5.0)
    s.add_argument("--seconds", type=float, default=10.0)
    s.add_argument("--timeout", type=float, default=10.0)
    s.add_argument("--prefix", default="c")
    s = sub.add_parser("probe-many")
    s.add_argument("ips", nargs="+")
    s.add_argument("--interval", type=float, default=0.1)
    s.add_argument("--seconds", type=float, default=10.0)
    s.add_argument("--timeout", type=float, default=0.3)
    a = ap.parse_args(argv)
    if a.cmd == "keepalived-node":
        return keepalived_node(a.node, a.dir)
    if a.cmd == "inject":
        targets = [(t.partition("/")[0], t.partition("/")[2]) for t in a.target]
        if not targets or a.rate <= 0:
            ap.error("inject needs --target and a positive --rate")
        return inject(targets, a.rate, a.seconds, a.timeout, a.prefix)
    if a.cmd == "probe-many":
        return probe_many(a.ips, max(a.interval, 0.01), a.seconds, a.timeout)
    return 2


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
