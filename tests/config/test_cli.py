"""``duravip check-config`` through ``duravip.cli.main`` and as a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from duravip.cli import main

DURAVIP = Path(sys.executable).with_name("duravip")


@pytest.fixture
def lab_file(tmp_path: Path, lab_n1: str) -> Path:
    p = tmp_path / "n1.conf"
    p.write_text(lab_n1)
    return p


def test_ok_summary(lab_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(lab_file)]) == 0
    out = capsys.readouterr().out
    assert "node n1 in cluster 'dvl', profile fast" in out
    assert "6 DuraVIPs" in out
    assert "10.1.1.1         smtp:25, binding duravip-1  prefer n1  on eth1/32" in out
    assert "10.1.2.1         smtp:25  follows duravip-1  on eth1/32" in out
    assert "plain listeners: 10.1.0.11:25" in out


def test_node_name_option(lab_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(lab_file), "--node-name", "zz"]) == 0
    assert "node zz in cluster" in capsys.readouterr().out


def test_json(lab_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--json", str(lab_file)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cluster"]["gossip_address"] == "10.1.0.11:4801"
    assert data["cluster"]["timers"]["probe_interval"] == 0.1
    assert data["duravips"]["10.1.2.1"]["follows"] == "duravip-1"
    assert data["control"]["mode"] == 0o600
    assert data["listeners"][0]["loc"].endswith("n1.conf:22:3")


def test_errors_and_warnings_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "bad.conf"
    p.write_text(
        "cluster { name = x gossip_address = 10.0.0.1:1 keyring = /k\n"
        '  Topology "10.1.0.0/16" { interface = eth1 cidrmask = 24 } }\n'
        'ESMTP_Listener { Listen "10.1.2.1:25" { Duravip_Follow = nope } }\n'
    )
    assert main(["check-config", str(p)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        f"{p}:2:45: warning: cidrmask 24 in Topology 10.1.0.0/16: DuraVIPs should be /32 "
        "(hint: a shorter mask adds a subnet route that moves with the address)"
    )
    assert err[1].startswith(f"{p}:3:41: error: Duravip_Follow names no binding 'nope'")
    assert err[-1] == f"{p}: 1 error"


def test_warning_only_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "w.conf"
    p.write_text("cluster { name = x gossip_address = 10.0.0.1:1 }\n")
    assert main(["check-config", str(p)]) == 0
    assert f"{p}:1:1: warning: no keyring" in capsys.readouterr().out


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(tmp_path / "nope.conf")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_many_duravips_are_summarised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listens = "\n".join(
        f'  Listen "10.1.1.{i}:25" {{ Enable_Duravip = true }}' for i in range(1, 31)
    )
    p = tmp_path / "many.conf"
    p.write_text(
        "cluster { name = x gossip_address = 10.0.0.1:1 keyring = /k\n"
        '  Topology "10.1.0.0/16" { interface = eth1 } }\n'
        f"ESMTP_Listener {{\n{listens}\n}}\n"
        "Binding b { Enable_Duravip = true Bind_Address = 10.1.9.9 }\n"
    )
    assert main(["check-config", str(p)]) == 0
    out = capsys.readouterr().out
    assert "31 DuraVIPs" in out
    assert "  10.1.1.1-10.1.1.30 (30): smtp:25 on eth1/32" in out
    assert "  10.1.9.9 (1): bindings on eth1/32" in out
    assert len(out.splitlines()) < 10


def test_subprocess(lab_file: Path, tmp_path: Path) -> None:
    ok = subprocess.run(
        [str(DURAVIP), "check-config", str(lab_file)], capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    assert "6 DuraVIPs" in ok.stdout
    bad = tmp_path / "bad.conf"
    bad.write_text("cluster {\n  name = x\n  gosip_address = 10.0.0.1:1\n}\n")
    res = subprocess.run(
        [str(DURAVIP), "check-config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 1
    assert (
        f"{bad}:3:3: error: unknown key 'gosip_address' in cluster (hint: did you mean 'gossip_address'?)"
        in res.stderr
    )


EXAMPLES = sorted((Path(__file__).parents[2] / "docs" / "examples").glob("*.conf"))


def test_examples_exist() -> None:
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_docs_examples_check_clean(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "warning" not in out and "DuraVIPs" in out


def test_docs_example_matches_its_printed_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    section = doc.split("## A complete example", 1)[1]
    blocks = section.split("```")
    config_text, summary_text = blocks[1], blocks[3]
    p = tmp_path / "n1.conf"
    p.write_text(config_text)
    assert main(["check-config", str(p)]) == 0
    out = capsys.readouterr().out.replace(str(p), "n1.conf")
    assert out.strip() == summary_text.strip()
