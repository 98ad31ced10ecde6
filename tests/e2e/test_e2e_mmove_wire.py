"""End to end: what a moved message looks like on the wire (issue 14).

A three-node lab; the client sends to 10.1.1.2 (held by n2) a message bound to
``duravip-3`` (held by n3), so n2 takes it on port 25 and mmoves it to n3 on
the cluster port. ``tcpdump`` runs inside n2's namespace, bounded by
``timeout`` and stopped by its PID. The capture must hold the mmove
connection but none of the message's body or envelope; as a control, the
same capture's plain SMTP injection on port 25 does show them.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.lab

CLUSTER_PORT = 4802  # duravip_lab.base.CLUSTER_PORT
CAPTURE_LIFETIME = 90  # seconds: tcpdump's hard bound (timeout(1))

Flow = tuple[str, int, str, int]


def _tcp_streams(pcap: bytes) -> dict[Flow, bytes]:
    """TCP payload per (src, sport, dst, dport), in sequence order, from a pcap file."""
    magic = pcap[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        end = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        end = ">"
    else:
        raise AssertionError(f"not a pcap file: {magic!r}")
    linktype = struct.unpack(end + "I", pcap[20:24])[0]
    segments: dict[Flow, dict[int, bytes]] = defaultdict(dict)
    pos = 24
    while pos + 16 <= len(pcap):
        incl = struct.unpack(end + "I", pcap[pos + 8 : pos + 12])[0]
        pkt = pcap[pos + 16 : pos + 16 + incl]
        pos += 16 + incl
        if linktype == 1:  # Ethernet, maybe VLAN-tagged
            off, ethertype = 14, pkt[12:14]
            while ethertype == b"\x81\x00":
                ethertype, off = pkt[off + 2 : off + 4], off + 4
        elif linktype == 113:  # Linux cooked
            off, ethertype = 16, pkt[14:16]
        else:
            raise AssertionError(f"unexpected link type {linktype}")
        if ethertype != b"\x08\x00" or len(pkt) < off + 20:
            continue
        ip = pkt[off:]
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        if ip[9] != 6:
            continue
        src = ".".join(str(b) for b in ip[12:16])
        dst = ".".join(str(b) for b in ip[16:20])
        tcp = ip[ihl:total]
        sport, dport, seq = struct.unpack("!HHI", tcp[:8])
        payload = tcp[(tcp[12] >> 4) * 4 :]
        if payload:
            segments[(src, sport, dst, dport)].setdefault(seq, payload)
    return {flow: b"".join(p for _, p in sorted(segs.items())) for flow, segs in segments.items()}


def _send(lab: Any, ip: str, *, mail_from: str, rcpt: str, data: str) -> None:
    code = f"""
import smtplib
with smtplib.SMTP({ip!r}, 25, timeout=15) as s:
    s.sendmail({mail_from!r}, [{rcpt!r}], {data!r})
"""
    lab.exec("client", [sys.executable, "-c", code], check=True, timeout=60)


def _mail_counter(lab: Any, node: str, name: str) -> int:
    p = lab.console(node, "metrics")
    assert p.returncode == 0, p.stderr
    for line in p.stdout.splitlines():
        if line.startswith("duravip_mail_total{") and f'"{name}"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def _start_capture(lab: Any, node: str, out: Path, log: Path) -> subprocess.Popen[bytes]:
    """tcpdump in ``node``'s namespace, bounded by timeout(1); returns once it listens."""
    argv = [
        "ip", "netns", "exec", lab.ns(node),
        "timeout", str(CAPTURE_LIFETIME),
        "tcpdump", "-i", "eth1", "-n", "-U", "--immediate-mode", "-Z", "root", "-s", "0", "-w", str(out),
        f"tcp port {CLUSTER_PORT} or tcp port 25",
    ]  # fmt: skip
    with log.open("wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 10
    while b"listening on" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_capture(proc)
            raise AssertionError(f"tcpdump did not start: {log.read_text(errors='replace')}")
        time.sleep(0.05)
    return proc


def _stop_capture(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM by PID (timeout(1) passes it to tcpdump, which flushes), SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def lab() -> Iterator[Any]:
    """A 3-node lab under a name no other run uses (the full PID), always torn down."""
    if os.geteuid() != 0:
        pytest.skip("lab tests need root (network namespaces)")
    import duravip_lab
    from duravip_lab.scenario import PREFERRED, VIPS, wait_converged

    name = f"t{os.getpid()}w"  # never a lab_factory name (digits only); caught by scripts/test
    lab = duravip_lab.Lab(name)
    try:
        lab.up(nodes=3, vips=3, profile="fast")
        lab.start()
        wait_converged(lab, VIPS, timeout=30, expect=PREFERRED)
        yield lab
    finally:
        lab.down()
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert f"{name}-" not in left, left


def test_mmove_on_the_wire_shows_no_message_text(lab: Any, tmp_path: Path) -> None:
    from duravip_lab.scenario import wait_delivered

    token = uuid.uuid4().hex[:12]
    marker = f"BODY-MARKER-{token}"
    mail_from = f"wire-sender-{token}@example.org"
    rcpt = f"wire-rcpt-{token}@example.net"
    mid = f"<{token}@lab.example>"
    body = "".join(f"{marker} line {i}: the quick brown fox\r\n" for i in range(40))
    data = (
        f"From: {mail_from}\r\nTo: {rcpt}\r\nSubject: wire {token}\r\nMessage-ID: {mid}\r\n"
        f"X-Binding: duravip-3\r\n\r\n{body}"
    )
    sent_before = _mail_counter(lab, "n2", "mmove_sent")

    pcap, log = tmp_path / "n2.pcap", tmp_path / "tcpdump.log"
    proc = _start_capture(lab, "n2", pcap, log)
    try:
        _send(lab, "10.1.1.2", mail_from=mail_from, rcpt=rcpt, data=data)
        seen = wait_delivered(lab, [mid], timeout=30)
        time.sleep(1.0)  # the mmove connection's last segments (QUIT, FIN)
    finally:
        _stop_capture(proc)

    # It really was moved: n2 counted the move, and n3 delivered it from duravip-3's IP.
    assert _mail_counter(lab, "n2", "mmove_sent") >= sent_before + 1
    (rec,) = seen[mid]
    assert rec["peer_ip"] == "10.1.1.3", json.dumps(rec)

    streams = _tcp_streams(pcap.read_bytes())
    mmove = {f: d for f, d in streams.items() if CLUSTER_PORT in (f[1], f[3])}
    smtp = {f: d for f, d in streams.items() if 25 in (f[1], f[3])}
    to_receiver = b"".join(d for f, d in mmove.items() if f[3] == CLUSTER_PORT)
    to_sender = b"".join(d for f, d in mmove.items() if f[1] == CLUSTER_PORT)
    # The mmove connection is in the capture, both ways, and carried at least the body.
    assert len(to_receiver) > len(body) and to_sender, {f: len(d) for f, d in streams.items()}
    wire = b"".join(mmove.values())
    secrets = [marker, token, mail_from, rcpt, "the quick brown fox", "MAIL FROM", "DATA"]
    for text in secrets:
        assert text.encode() not in wire, f"{text!r} readable in the mmove capture"
    assert b"DVMMOVE2 " in to_sender  # the clear preamble: only nonces and MACs
    # Control: the same capture of the plain SMTP injection shows all of it.
    injected = b"".join(smtp.values())
    for text in (marker, mail_from, rcpt):
        assert text.encode() in injected, f"{text!r} missing from the port 25 control"
