#!/usr/bin/env python3
"""Connect to IP:PORT every interval, read the SMTP banner, print one JSON line per try.

Runs in the lab's client namespace. Bounded in time (``--seconds``) and so in
count; each try has its own timeout so a black-holed VIP shows as failures at
the right moments instead of one long hang. Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

_NODE_RE = re.compile(r"\b(n\d+)\b")


def node_of(banner: str) -> str | None:
    """The node name a banner names: a word like ``n2``, else the host after ``220``."""
    m = _NODE_RE.search(banner)
    if m:
        return m.group(1)
    words = banner.split()
    return words[1] if len(words) > 1 else None


def attempt(ip: str, port: int, timeout: float) -> dict[str, object]:
    t0 = time.monotonic()
    try:
        with socket.create_connection((ip, port), timeout=timeout) as s:
            s.settimeout(timeout)
            buf = b""
            while b"\n" not in buf and len(buf) < 4096:
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
            banner = buf.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
            if not banner.startswith("220"):
                raise ConnectionError(f"no 220 banner: {banner!r}")
            # The banner is what we came for; a reset on QUIT changes nothing.
            with contextlib.suppress(OSError):
                s.sendall(b"QUIT\r\n")
            return {
                "ok": True,
                "node": node_of(banner),
                "banner": banner,
                "error": None,
                "ms": round((time.monotonic() - t0) * 1000, 3),
            }
    except OSError as e:
        err = type(e).__name__ if not str(e) else f"{type(e).__name__}: {e}"
        return {
            "ok": False,
            "node": None,
            "banner": None,
            "error": err,
            "ms": round((time.monotonic() - t0) * 1000, 3),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("target", metavar="IP[:PORT]")
    ap.add_argument("--interval", type=float, default=0.02)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=0.5)
    ap.add_argument("--until-ok", action="store_true", help="stop at the first good banner")
    ap.add_argument(
        "--sequential",
        action="store_true",
        help="one try at a time (a hung try skips the slots it overruns); default: a try "
        "starts every interval whatever the others do, so a SYN lost to a dead host does "
        "not hide the moment the new holder answers",
    )
    args = ap.parse_args()
    ip, _, port = args.target.partition(":")
    if args.target.startswith("["):  # [2001:db8:1::1]:25 (IPv6)
        ip, _, port = args.target[1:].partition("]")
        port = port.lstrip(":")
    elif args.target.count(":") > 1:  # a bare IPv6 address
        ip, port = args.target, ""
    interval = max(args.interval, 0.001)
    start = time.monotonic()
    max_tries = int(args.seconds / interval) + 1
    lock = threading.Lock()
    done = threading.Event()

    def one(t: float) -> None:
        rec = {"t": round(t, 4), "ts": time.time(), **attempt(ip, int(port or 25), args.timeout)}
        with lock:
            print(json.dumps(rec), flush=True)
        if args.until_ok and rec["ok"]:
            done.set()

    workers = 1 if args.sequential else int(args.timeout / interval) + 2
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for k in range(max_tries):
            slot = start + k * interval
            now = time.monotonic()
            if now - start >= args.seconds or done.is_set():
                break
            if slot > now:
                time.sleep(slot - now)
            elif now - slot > interval:
                continue  # overran this slot: skip it rather than burst
            t = time.monotonic() - start
            if args.sequential:
                one(t)
            else:
                pool.submit(one, t)


if __name__ == "__main__":
    main()
