#!/usr/bin/env python3
"""A stand-in for the duravip daemon in lab tests: an SMTP banner and nothing else.

Listens on 0.0.0.0:PORT inside its node namespace (so it also answers on any
DuraVIP added to the node later) and greets with ``220 <node> ...``. Exits 0 on
SIGTERM, after printing a line, so tests can tell a graceful stop from a kill.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading


def main() -> None:
    node = sys.argv[1] if len(sys.argv) > 1 else "n?"
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    srv = socket.create_server(("0.0.0.0", port), backlog=512, reuse_port=False)
    srv.settimeout(0.05)
    print(f"standin {node}: listening on :{port}", flush=True)
    while not stop.is_set():
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            continue
        with conn:
            try:
                conn.sendall(f"220 {node} ESMTP duravip-lab-standin\r\n".encode())
            except OSError as e:
                print(f"standin {node}: send failed: {e}", flush=True)
    print(f"standin {node}: SIGTERM, leaving", flush=True)


if __name__ == "__main__":
    main()
