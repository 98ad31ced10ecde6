#!/usr/bin/env python3
"""The lab's smarthost: accepts every message and records who sent what.

Plain asyncio and the standard library only, so it runs in the sink namespace
with any Python and never depends on the code under test. One JSON line per
message goes to the log: peer_ip, mail_from, rcpt, message_id, received_at, size.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import re
import signal
import time
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import IO

MAX_LINE = 1 << 16
MAX_MESSAGE = 100 * 1024 * 1024
IDLE_TIMEOUT = 300.0
_ADDR_RE = re.compile(rb"^(?:MAIL\s+FROM|RCPT\s+TO)\s*:\s*<?([^>\s]*)>?", re.IGNORECASE)


class Recorder:
    """Appends one JSON object a line; flushed per message so readers see it at once."""

    def __init__(self, path: Path) -> None:
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self._ids = itertools.count(1)

    def record(self, peer: str, mail_from: str, rcpt: list[str], data: bytes) -> int:
        headers = BytesHeaderParser().parsebytes(data)
        mid = headers.get("Message-ID")
        rec = {
            "peer_ip": peer,
            "mail_from": mail_from,
            "rcpt": rcpt,
            "message_id": str(mid).strip() if mid is not None else None,
            "received_at": time.time(),
            "size": len(data),
        }
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        return next(self._ids)


async def read_data(reader: asyncio.StreamReader) -> bytes | None:
    """DATA body up to the lone dot, dot-unstuffed; None if the peer went away."""
    chunks: list[bytes] = []
    size = 0
    while True:
        line = await reader.readline()
        if not line:
            return None
        if line in (b".\r\n", b".\n"):
            return b"".join(chunks)
        if line.startswith(b"."):
            line = line[1:]
        size += len(line)
        if size <= MAX_MESSAGE:
            chunks.append(line)


async def session(
    rec: Recorder, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    peer = writer.get_extra_info("peername")[0]
    mail_from: str | None = None
    rcpt: list[str] = []

    def reply(text: str) -> None:
        writer.write(text.encode() + b"\r\n")

    reply("220 sink ESMTP duravip-lab-sink")
    while True:
        await writer.drain()
        try:
            line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
        except (TimeoutError, asyncio.LimitOverrunError, ValueError):
            reply("421 4.4.2 timeout or line too long")
            break
        if not line:
            break
        verb = line[:4].upper()
        if verb == b"EHLO":
            reply(
                "250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 104857600"
            )
        elif verb == b"HELO":
            reply("250 sink")
        elif verb in (b"MAIL", b"RCPT"):
            m = _ADDR_RE.match(line.strip())
            if m is None:
                reply("501 5.5.4 syntax")
            elif verb == b"MAIL":
                mail_from, rcpt = m.group(1).decode("utf-8", "replace"), []
                reply("250 2.1.0 ok")
            elif mail_from is None:
                reply("503 5.5.1 MAIL first")
            else:
                rcpt.append(m.group(1).decode("utf-8", "replace"))
                reply("250 2.1.5 ok")
        elif verb == b"DATA":
            if mail_from is None or not rcpt:
                reply("503 5.5.1 need MAIL and RCPT")
                continue
            reply("354 go ahead")
            await writer.drain()
            data = await read_data(reader)
            if data is None:
                break
            n = rec.record(peer, mail_from, rcpt, data)
            reply(f"250 2.0.0 ok queued as S{n}")
            mail_from, rcpt = None, []
        elif verb == b"RSET":
            mail_from, rcpt = None, []
            reply("250 2.0.0 ok")
        elif verb == b"NOOP":
            reply("250 2.0.0 ok")
        elif verb == b"QUIT":
            reply("221 2.0.0 bye")
            break
        elif verb == b"VRFY":
            reply("252 2.1.5 maybe")
        else:
            reply("502 5.5.2 not implemented")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--listen",
        action="append",
        help="ip:port or [ipv6]:port; repeat for several (default 10.1.0.3:25)",
    )
    ap.add_argument("--log", type=Path, required=True)
    ap.add_argument("--ready", type=Path, default=None, help="file created once listening")
    args = ap.parse_args()
    listen = args.listen or ["10.1.0.3:25"]
    rec = Recorder(args.log)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await session(rec, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            print(f"sink: session ended: {e!r}", flush=True)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    servers = []
    for where in listen:
        host, _, port = where.rpartition(":")
        host = host.strip("[]")  # [2001:db8::3]:25
        servers.append(
            await asyncio.start_server(handle, host, int(port), backlog=4096, limit=MAX_LINE)
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.ready:
        args.ready.touch()
    print(f"sink: listening on {' '.join(listen)}", flush=True)
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            await stack.enter_async_context(server)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
