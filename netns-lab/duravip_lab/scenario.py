"""Scenario helpers shared by the end-to-end tests, the demo and the benchmarks.

They watch a running lab from outside, the way an operator would: which node
has which DuraVIP on its interface (``ip addr`` in each namespace), who answers
SMTP on a VIP (the 220 banner names the node), what the sink received.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

from .lab import Lab

#: The DuraVIPs of the lab's default 3-node, 3-VIP configs (see docs/examples/).
VIPS = ["10.1.1.1", "10.1.1.2", "10.1.1.3", "10.1.1.101", "10.1.1.102", "10.1.2.1"]
#: Those with an SMTP listener (the pool bindings have none: nothing answers there).
LISTENER_VIPS = ["10.1.1.1", "10.1.1.2", "10.1.1.3", "10.1.2.1"]
#: Where each VIP with a preference (or following one) lives when all is well.
PREFERRED = {"10.1.1.1": "n1", "10.1.1.2": "n2", "10.1.1.3": "n3", "10.1.2.1": "n1"}


def holders(lab: Lab, nodes: Iterable[str] | None = None) -> dict[str, list[str]]:
    """VIP -> nodes that have it plumbed right now."""
    out: dict[str, list[str]] = {}
    for n in nodes if nodes is not None else lab.nodes:
        if not lab.link_up(n):
            continue  # a crashed host's leftovers are not reachable: not a holder
        for ip in lab.holds(n):
            out.setdefault(ip, []).append(n)
    return out


def print_log_tails(lab: Lab, lines: int = 15) -> None:
    """Each daemon's last log lines on stderr: what a failed test's teardown shows."""
    for n in lab.nodes if lab.exists() else []:
        log = lab.log_path(n)
        if log.exists():
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            print(f"--- {n} daemon.log (tail)\n" + "\n".join(tail), file=sys.stderr)


def wait_converged(
    lab: Lab,
    vips: Iterable[str],
    *,
    timeout: float = 20.0,
    expect: dict[str, str] | None = None,
    nodes: Iterable[str] | None = None,
) -> dict[str, str]:
    """Wait until every VIP is held by exactly one node (and by ``expect[vip]`` if given)."""
    vips = list(vips)
    deadline = time.monotonic() + timeout
    last: dict[str, list[str]] = {}
    while time.monotonic() < deadline:
        last = holders(lab, nodes)
        single = {v: h[0] for v, h in last.items() if len(h) == 1}
        if all(v in single for v in vips) and all(
            single.get(v) == n for v, n in (expect or {}).items()
        ):
            return {v: single[v] for v in vips}
        time.sleep(0.05)
    raise TimeoutError(f"not converged after {timeout}s: holders {last}, expected {expect}")


class HolderSampler:
    """Samples holders in a background thread; counts moments with two holders for one IP."""

    def __init__(self, lab: Lab, interval: float = 0.05, nodes: Iterable[str] | None = None) -> None:
        self.lab = lab
        self.interval = interval
        self.nodes = list(nodes) if nodes is not None else None
        self.samples: list[tuple[float, dict[str, list[str]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            self.samples.append((t, self._confirmed(holders(self.lab, self.nodes))))
            self._stop.wait(self.interval)

    def _confirmed(self, sample: dict[str, list[str]]) -> dict[str, list[str]]:
        """Drop doubles that a sequential read made up.

        Nodes are read one after another (a few ms each), so a clean handover
        can look like two holders: the old one read before it released, the
        new one after it plumbed. Re-reading the earlier holders settles it:
        one that still holds the IP held it when the later one was read too.
        """
        for ip, hs in sample.items():
            if len(hs) > 1:
                still = [h for h in hs[:-1] if ip in self.lab.holds(h)]
                sample[ip] = [*still, hs[-1]]
        return sample

    def __enter__(self) -> HolderSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def double_holder_samples(self) -> list[tuple[float, str, list[str]]]:
        return [(t, ip, h) for t, hs in self.samples for ip, h in hs.items() if len(h) > 1]


class Prober:
    """Probes one VIP's SMTP banner every ``interval`` in the background (bounded)."""

    def __init__(self, lab: Lab, ip: str, *, seconds: float, interval: float = 0.02,
                 port: int = 25, timeout: float = 0.3) -> None:
        self.lab = lab
        self.ip, self.port, self.interval = ip, port, interval
        self.seconds, self.timeout = seconds, timeout
        self.records: list[dict[str, Any]] = []
        self.started_at = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.records = self.lab.probe(
            self.ip, self.port, self.interval, self.seconds, self.timeout
        )

    def start(self) -> Prober:
        self.started_at = time.time()
        self._thread.start()
        # Let the probe process start in the client namespace before a fault.
        time.sleep(0.3)
        return self

    def join(self) -> list[dict[str, Any]]:
        self._thread.join(timeout=self.seconds + 30)
        return self.records

    def failover_ms(self, fault_at: float, new_holder: str | None = None) -> float | None:
        """Wall time from the fault to the first good banner from another node (or ``new_holder``)."""
        before = {r["node"] for r in self.records if r["ok"] and r["ts"] < fault_at}
        for r in self.records:
            if r["ts"] < fault_at or not r["ok"]:
                continue
            if (new_holder is not None and r["node"] == new_holder) or (
                new_holder is None and r["node"] not in before
            ):
                return (float(r["ts"]) - fault_at) * 1000.0
        return None

    def failed(self, after: float = 0.0) -> int:
        return sum(1 for r in self.records if not r["ok"] and r["ts"] >= after)

    def longest_gap_ms(self) -> float:
        """Longest stretch of failed probes (ms), between two good answers or the ends."""
        gap = 0.0
        start: float | None = None
        for r in self.records:
            if not r["ok"]:
                if start is None:
                    start = r["ts"]
            elif start is not None:
                gap = max(gap, (r["ts"] - start) * 1000.0)
                start = None
        if start is not None and self.records:
            gap = max(gap, (self.records[-1]["ts"] - start) * 1000.0)
        return gap


def send_mail(lab: Lab, ip: str, *, port: int = 25, subject: str, headers: dict[str, str] | None = None,
              count: int = 1, mail_from: str = "demo@example.org", rcpt: str = "user@example.net") -> list[str]:
    """Send ``count`` messages from the client namespace with smtplib; returns their Message-IDs."""
    hdrs = "".join(f"{k}: {v}\\r\\n" for k, v in (headers or {}).items())
    code = f"""
import smtplib, email.utils, json
ids = []
with smtplib.SMTP({ip!r}, {port}, timeout=10) as s:
    for i in range({count}):
        mid = email.utils.make_msgid(domain="lab.example")
        msg = ("From: {mail_from}\\r\\nTo: {rcpt}\\r\\nSubject: {subject} " + str(i) + "\\r\\n"
               "Message-ID: " + mid + "\\r\\n{hdrs}\\r\\nhello from the duravip lab\\r\\n")
        s.sendmail({mail_from!r}, [{rcpt!r}], msg)
        ids.append(mid)
print(json.dumps(ids))
"""
    import json
    import sys

    out = lab.exec("client", [sys.executable, "-c", code], check=True, timeout=60)
    result: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def wait_delivered(lab: Lab, message_ids: Iterable[str], timeout: float = 30.0) -> dict[str, list[dict[str, Any]]]:
    """Wait until the sink recorded every message id; returns id -> sink records."""
    ids = set(message_ids)
    deadline = time.monotonic() + timeout
    seen: dict[str, list[dict[str, Any]]] = {}
    while time.monotonic() < deadline:
        seen = {}
        for rec in lab.sink_log():
            if rec.get("message_id") in ids:
                seen.setdefault(rec["message_id"], []).append(rec)
        if set(seen) == ids:
            return seen
        time.sleep(0.2)
    missing = ids - set(seen)
    raise TimeoutError(f"{len(missing)} of {len(ids)} messages not delivered after {timeout}s")
