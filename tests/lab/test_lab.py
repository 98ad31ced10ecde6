"""End-to-end tests of the netns lab itself, with a stand-in instead of the daemon."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
LAB_DIR = REPO / "netns-lab"
STANDIN = "{python} -m duravip_lab.standin {node}"

Factory = Callable[..., Any]


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def ping(lab: Any, src: str, dst: str, wait: float = 0.5) -> bool:
    p = lab.exec(src, ["ping", "-n", "-q", "-c", "1", "-W", str(wait), dst], timeout=10)
    return bool(p.returncode == 0)


def ping_loss(lab: Any, src: str, dst: str, count: int) -> float:
    """Loss percentage ping reports for ``count`` pings at 5 ms."""
    p = lab.exec(
        src, ["ping", "-n", "-q", "-c", str(count), "-i", "0.005", "-W", "0.3", dst], timeout=30
    )
    m = re.search(r"([\d.]+)% packet loss", p.stdout)
    assert m, p.stdout + p.stderr
    return float(m.group(1))


def wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_up_down_leaves_nothing(lab_factory: Factory) -> None:
    lab = lab_factory(nodes=3)
    mine = sorted(ns for ns in namespaces() if ns.startswith(f"{lab.name}-"))
    assert mine == sorted(f"{lab.name}-{m}" for m in ("sw", "n1", "n2", "n3", "client", "sink"))
    key = (lab.state_dir / "keyring").read_text().split()
    assert len(key) == 1 and len(base64.b64decode(key[0])) == 32
    assert (lab.state_dir / "keyring").stat().st_mode & 0o077 == 0
    assert all(lab.config_path(n).exists() for n in lab.nodes)
    assert lab.running("sink")
    sink_pid = lab.pid("sink")
    lab.down()
    assert not [ns for ns in namespaces() if ns.startswith(f"{lab.name}-")]
    assert not lab.state_dir.exists()
    assert (
        not Path(f"/proc/{sink_pid}/cmdline").exists()
        or b"sink.py" not in Path(f"/proc/{sink_pid}/cmdline").read_bytes()
    )
    lab.down()  # twice is fine


def test_failed_up_rolls_back(lab_factory: Factory) -> None:
    with pytest.raises(Exception, match=r"sink died at start") as exc:
        lab_factory(python="/nonexistent/python")
    m = re.search(r"/run/duravip-lab/(\w+)/", str(exc.value))
    assert m, str(exc.value)
    name = m.group(1)
    assert not [ns for ns in namespaces() if ns.startswith(f"{name}-")]
    assert not Path("/run/duravip-lab", name).exists()


def test_two_labs_are_separate_segments(lab_factory: Factory) -> None:
    a = lab_factory(nodes=2)
    b = lab_factory(nodes=2)
    a.exec("n1", ["ip", "addr", "add", "10.1.1.50/32", "dev", "eth1"], check=True)
    assert ping(a, "client", "10.1.0.11")
    assert ping(b, "client", "10.1.0.11")  # same addresses, other segment
    assert ping(a, "client", "10.1.1.50")
    assert not ping(b, "client", "10.1.1.50", wait=0.3)
    assert a.holds("n1") == ["10.1.1.50"] and b.holds("n1") == []


def test_partition_blocks_between_groups_only_and_heal_restores(lab_factory: Factory) -> None:
    lab = lab_factory(nodes=3)
    for dst in ("10.1.0.12", "10.1.0.13", "10.1.0.2", "10.1.0.3"):
        assert ping(lab, "n1", dst)
    lab.partition(["n1"], ["n2", "n3"])
    assert not ping(lab, "n1", "10.1.0.12", wait=0.3)
    assert not ping(lab, "n3", "10.1.0.11", wait=0.3)
    assert ping(lab, "n2", "10.1.0.13")  # within a group
    assert ping(lab, "n1", "10.1.0.2")  # client is in neither group
    # raw L2 (what AF_PACKET gratuitous ARP uses) is blocked too: arping gets no reply
    p = lab.exec("n1", ["arping", "-c", "1", "-w", "0.5", "-I", "eth1", "10.1.0.12"], timeout=10)
    assert p.returncode != 0, p.stdout
    lab.heal()
    assert ping(lab, "n1", "10.1.0.12")
    assert ping(lab, "n3", "10.1.0.11")


def test_loss_drops_roughly_the_share(lab_factory: Factory) -> None:
    lab = lab_factory(nodes=2)
    lab.loss(30, "n1")
    lost = ping_loss(lab, "client", "10.1.0.11", 200)
    assert 15 <= lost <= 45, lost
    assert ping_loss(lab, "client", "10.1.0.12", 50) == 0  # n2 was not named
    lab.heal()
    assert ping_loss(lab, "client", "10.1.0.11", 50) == 0


def test_process_faults_on_standin(lab_factory: Factory) -> None:
    lab = lab_factory(nodes=3, daemon_cmd=STANDIN)
    started = lab.start()
    assert set(started) == {"n1", "n2", "n3"}
    assert lab.start() == {}  # already running: left alone
    assert wait_for(lambda: "listening" in lab.log_path("n1").read_text())

    lab.pause("n1")
    assert lab.proc_state("n1") == "T"
    lab.resume("n1")
    assert wait_for(lambda: lab.proc_state("n1") in ("S", "R"))

    lab.kill("n2")
    assert not lab.running("n2") and lab.link_up("n2")
    assert "leaving" not in lab.log_path("n2").read_text()

    old = lab.pid("n3")
    lab.exec("n3", ["ip", "addr", "add", "10.1.1.3/32", "dev", "eth1"], check=True)
    lab.exec("n3", ["ip", "addr", "add", "10.1.2.1/24", "dev", "eth1"], check=True)
    lab.crash("n3")
    assert not lab.running("n3") and not lab.link_up("n3")
    assert lab.holds("n3") == ["10.1.1.3", "10.1.2.1"]  # the dead host's addresses stay
    assert not ping(lab, "client", "10.1.0.13", wait=0.3)
    lab.revive("n3")
    assert lab.running("n3") and lab.pid("n3") != old and lab.link_up("n3")
    assert lab.holds("n3") == []
    assert lab._port_state("n3") == "forwarding"
    # main address kept; the client's stale INCOMPLETE ARP entry retries after 1 s
    assert ping(lab, "client", "10.1.0.13", wait=2.5)

    lab.pause("n1")
    assert lab.stop("n1", timeout=5)  # even a paused daemon gets to leave gracefully
    assert not lab.running("n1")
    assert "SIGTERM, leaving" in lab.log_path("n1").read_text()
    st = lab.status()
    assert {n: st["nodes"][n]["running"] for n in lab.nodes} == {
        "n1": False,
        "n2": False,
        "n3": True,
    }


def test_probe_reports_standin_banner(lab_factory: Factory) -> None:
    lab = lab_factory(nodes=2, daemon_cmd=STANDIN)
    lab.start("n2")
    assert wait_for(lambda: "listening" in lab.log_path("n2").read_text())
    recs = lab.probe("10.1.0.12", 25, interval=0.02, seconds=0.3)
    assert 5 <= len(recs) <= 20
    assert all(r["ok"] and r["node"] == "n2" for r in recs), recs
    assert [r["t"] for r in recs] == sorted(r["t"] for r in recs)
    down = lab.probe("10.1.0.11", 25, interval=0.05, seconds=0.2, timeout=0.1)
    assert down and not any(r["ok"] for r in down)  # n1 runs nothing: refused


def test_sink_records_smtplib_and_swaks(lab_factory: Factory) -> None:
    lab = lab_factory(nodes=1)
    script = (
        "import smtplib\n"
        "s = smtplib.SMTP('10.1.0.3', 25, timeout=5)\n"
        "s.sendmail('a@lab', ['b@lab', 'c@lab'],"
        " 'Message-ID: <t1@lab>\\r\\nSubject: x\\r\\n\\r\\n.dot\\r\\nbody\\r\\n')\n"
        "s.sendmail('d@lab', ['e@lab'], 'Subject: no id\\r\\n\\r\\nhi\\r\\n')\n"
        "s.quit()\n"
    )
    p = lab.exec("client", [sys.executable, "-c", script], timeout=20)
    assert p.returncode == 0, p.stderr
    p = lab.exec(
        "n1",
        ["swaks", "--server", "10.1.0.3", "--from", "s@lab", "--to", "t@lab", "--pipeline"],
        timeout=20,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    log = lab.sink_log()
    assert [(r["peer_ip"], r["mail_from"], r["rcpt"]) for r in log] == [
        ("10.1.0.2", "a@lab", ["b@lab", "c@lab"]),
        ("10.1.0.2", "d@lab", ["e@lab"]),
        ("10.1.0.11", "s@lab", ["t@lab"]),
    ]
    assert log[0]["message_id"] == "<t1@lab>" and log[1]["message_id"] is None
    assert log[2]["message_id"]
    assert log[0]["size"] == len(
        b"Message-ID: <t1@lab>\r\nSubject: x\r\n\r\n.dot\r\nbody\r\n"
    )  # unstuffed
    assert all(abs(r["received_at"] - time.time()) < 60 for r in log)


def test_sink_survives_many_concurrent_connections(lab_factory: Factory) -> None:
    lab = lab_factory(nodes=1)
    script = (
        "import smtplib, threading\n"
        "errs = []\n"
        "def one(i):\n"
        "    try:\n"
        "        s = smtplib.SMTP('10.1.0.3', 25, timeout=10)\n"
        "        s.sendmail(f'f{i}@lab', ['r@lab'], f'Message-ID: <c{i}@lab>\\r\\n\\r\\nx\\r\\n')\n"
        "        s.quit()\n"
        "    except Exception as e:\n"
        "        errs.append(repr(e))\n"
        "ts = [threading.Thread(target=one, args=(i,)) for i in range(100)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "print(errs); raise SystemExit(1 if errs else 0)\n"
    )
    p = lab.exec("client", [sys.executable, "-c", script], timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    ids = sorted(r["message_id"] for r in lab.sink_log())
    assert ids == sorted(f"<c{i}@lab>" for i in range(100))


def test_status_json_shape(lab_factory: Factory) -> None:
    lab = lab_factory(nodes=3, vips=4)
    lab.exec("n2", ["ip", "addr", "add", "10.1.1.2/32", "dev", "eth1"], check=True)
    st = lab.status()
    assert st["nodes"]["n2"] == {
        "ip": "10.1.0.12",
        "running": False,
        "pid": None,
        "state": None,
        "link_up": True,
        "holds": ["10.1.1.2"],
    }
    assert st["vips"] == [
        "10.1.1.1", "10.1.1.2", "10.1.1.3", "10.1.1.4", "10.1.1.101", "10.1.1.102", "10.1.2.1",
    ]  # fmt: skip
    assert st["bindings"]["duravip-4"] == "10.1.1.4" and st["bindings"]["pool-b"] == "10.1.1.102"
    assert st["listeners"]["10.1.1.4:25"] == {"duravip": True, "follow": None}
    assert st["listeners"]["10.1.2.1:25"] == {"duravip": False, "follow": "duravip-1"}
    assert st["listeners"]["10.1.0.13:25"] == {"duravip": False, "follow": None}


def test_cli_commands(lab_factory: Factory) -> None:
    lab = lab_factory(nodes=2, daemon_cmd=STANDIN)
    cli = [sys.executable, str(LAB_DIR / "lab")]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli, *args], capture_output=True, text=True, timeout=30, check=False
        )

    assert run("start", "n1", "--name", lab.name).returncode == 0
    assert run("--name", lab.name, "config", "n2").stdout.strip() == str(lab.config_path("n2"))
    st = json.loads(run("--name", lab.name, "status", "--json").stdout)
    assert st["nodes"]["n1"]["running"] and not st["nodes"]["n2"]["running"]
    p = run("--name", lab.name, "exec", "n2", "--", "ip", "-br", "-4", "addr", "show", "eth1")
    assert "10.1.0.12/16" in p.stdout
    assert run("--name", lab.name, "exec", "n2", "--", "false").returncode == 1
    assert run("--name", lab.name, "pause", "n1").returncode == 0
    assert lab.proc_state("n1") == "T"
    assert run("--name", lab.name, "resume", "n1").returncode == 0
    assert run("--name", lab.name, "crash", "n1").returncode == 0
    assert not lab.running("n1") and not lab.link_up("n1")
    assert run("--name", lab.name, "stop", "n9").returncode == 1
    assert run("--name", "nosuchlab", "status").returncode == 1
