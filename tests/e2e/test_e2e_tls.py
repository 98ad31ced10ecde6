"""End to end: STARTTLS through a DuraVIP listener in the netns lab (issue 14).

Two real daemons whose ESMTP listeners have ``tls = required`` with a
certificate from a throw-away CA; swaks (``--tls``) and Python's
``smtplib.starttls()`` run in the client namespace, and the sink records each
message exactly once. A plaintext MAIL is refused with ``530``. Then a new
certificate and ``config reload``: the next session sees the new certificate.
"""

from __future__ import annotations

import email.utils
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from duravip_lab.config import with_tls
from duravip_lab.scenario import wait_converged, wait_delivered

pytestmark = pytest.mark.lab

VIP1, VIP2 = "10.1.1.1", "10.1.1.2"


def _certs() -> ModuleType:
    """``tests/smtp/certs.py`` (the test CA), loaded by path: test dirs are not packages."""
    path = Path(__file__).parent.parent / "smtp" / "certs.py"
    spec = importlib.util.spec_from_file_location("duravip_test_certs_e2e", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMTPLIB_CLIENT = """
import json, smtplib, ssl, sys
ip, ca, mid = sys.argv[1:4]
ctx = ssl.create_default_context(cafile=ca)
with smtplib.SMTP(ip, 25, timeout=15) as s:
    s.ehlo("client.lab.example")
    offered = s.has_extn("starttls")
    try:
        s.sendmail("plain@example.org", ["user@example.net"], "Subject: plain\\r\\n\\r\\nno\\r\\n")
        plain = None
    except smtplib.SMTPSenderRefused as exc:
        plain = [exc.smtp_code, exc.smtp_error.decode()]
    s.rset()
    s.starttls(context=ctx)
    s.ehlo("client.lab.example")
    version = s.sock.version()
    msg = ("From: tls@example.org\\r\\nTo: user@example.net\\r\\nSubject: smtplib tls\\r\\n"
           "Message-ID: " + mid + "\\r\\n\\r\\nhello over STARTTLS\\r\\n")
    refused = s.sendmail("tls@example.org", ["user@example.net"], msg)
print(json.dumps({"offered": offered, "plain": plain, "version": version, "refused": refused}))
"""


PEER_SERIAL = """
import smtplib, ssl, sys
with smtplib.SMTP(sys.argv[1], 25, timeout=15) as s:
    s.starttls(context=ssl.create_default_context(cafile=sys.argv[2]))
    print(s.sock.getpeercert()["serialNumber"])
"""


def test_swaks_and_smtplib_deliver_over_starttls(lab_factory: Callable[..., Any]) -> None:
    lab = lab_factory(nodes=2, vips=2)
    try:
        tls_dir = lab.state_dir / "tls"
        tls_dir.mkdir()
        ca = _certs().TestCA(tls_dir)
        files = ca.issue("mx", "mx.lab.example", VIP1, VIP2, "10.1.2.1")
        for node in lab.nodes:
            path = lab.config_path(node)
            path.write_text(with_tls(path.read_text(), files.certificate, files.key, "required"))
            check = subprocess.run(
                [sys.executable, "-m", "duravip", "check-config", str(path)],
                capture_output=True,
                text=True,
                check=False,
            )
            assert check.returncode == 0, check.stdout + check.stderr
        lab.start()
        wait_converged(lab, [VIP1, VIP2], timeout=30)

        swaks_id = email.utils.make_msgid(domain="swaks.lab.example")
        p = lab.exec(
            "client",
            [
                "swaks", "--server", f"{VIP1}:25", "--tls",
                "--from", "swaks@example.org", "--to", "user@example.net",
                "--header", f"Message-Id: {swaks_id}",
                "--header", "Subject: swaks tls",
                "--body", "hello from swaks over STARTTLS",
            ],
            timeout=60,
        )  # fmt: skip
        assert p.returncode == 0, p.stdout + p.stderr
        assert "220 2.0.0 Ready to start TLS" in p.stdout
        assert "TLS started" in p.stdout
        assert "250 2.0.0 Ok: queued as" in p.stdout

        smtplib_id = email.utils.make_msgid(domain="smtplib.lab.example")
        p = lab.exec(
            "client",
            [sys.executable, "-c", SMTPLIB_CLIENT, VIP2, str(ca.ca_file), smtplib_id],
            timeout=60,
        )
        assert p.returncode == 0, p.stdout + p.stderr
        result = json.loads(p.stdout.strip().splitlines()[-1])
        assert result["offered"] is True
        assert result["plain"] == [530, "5.7.0 Must issue a STARTTLS command first"]
        assert result["version"] in ("TLSv1.2", "TLSv1.3")
        assert result["refused"] == {}

        try:
            seen = wait_delivered(lab, [swaks_id, smtplib_id], timeout=30)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}: sink saw {lab.sink_log()}") from exc
        time.sleep(2.0)  # a duplicate would come within the delivery retry window
        counts: dict[str, int] = {}
        for rec in lab.sink_log():
            mid = rec.get("message_id")
            counts[mid] = counts.get(mid, 0) + 1
        assert counts.get(swaks_id) == 1 and counts.get(smtplib_id) == 1, counts
        assert len(seen) == 2
        # Nothing sent in plaintext reached the sink.
        assert not any(r.get("mail_from") == "plain@example.org" for r in lab.sink_log())

        # A new certificate takes effect on `config reload` (as on SIGHUP).
        new = ca.issue("mx2", "mx.lab.example", VIP1, VIP2, "10.1.2.1")
        for node in lab.nodes:
            path = lab.config_path(node)
            text = path.read_text().replace(str(files.certificate), str(new.certificate))
            path.write_text(text.replace(str(files.key), str(new.key)))
            p = lab.console(node, "config", "reload")
            assert p.returncode == 0, p.stdout + p.stderr
        p = lab.exec("client", [sys.executable, "-c", PEER_SERIAL, VIP1, str(ca.ca_file)])
        assert p.returncode == 0, p.stdout + p.stderr
        assert int(p.stdout.strip(), 16) == new.serial
    finally:
        lab.down()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    assert not any(line.startswith(f"{lab.name}-") for line in listed.stdout.splitlines())
