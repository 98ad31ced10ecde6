"""The lab is an installed package: importable from anywhere, no path tricks left, small modules.

No namespaces here, so no root and no ``lab`` mark.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "netns-lab" / "duravip_lab"
#: Spelled in two halves so this very file does not match what it looks for.
PATH_HACKS = ("sys.path." + "insert", "sys.path." + "append")
#: Every script that drives the lab, and the other benchmarks: all must start from any cwd.
SCRIPTS = sorted(
    p.name
    for p in (REPO / "scripts").iterdir()
    if p.name in ("demo.py", "chaos") or p.name.startswith("bench-")
)


def path_hacks(roots: list[Path]) -> list[str]:
    """``file:line`` of every sys.path edit in text files under ``roots``."""
    found = []
    for root in roots:
        for f in sorted(root.rglob("*")):
            if not f.is_file() or "__pycache__" in f.parts:
                continue
            try:
                text = f.read_text()
            except UnicodeDecodeError:
                continue
            for n, line in enumerate(text.splitlines(), 1):
                if any(h in line for h in PATH_HACKS):
                    found.append(f"{f.relative_to(root.parent)}:{n}")
    return found


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_no_sys_path_edits_in_scripts_tests_or_the_lab() -> None:
    assert path_hacks([REPO / "scripts", REPO / "tests", REPO / "netns-lab"]) == []


def test_path_hack_scan_finds_one(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "x").write_text("import sys\n" + PATH_HACKS[0] + '(0, "lab")\n')
    assert path_hacks([tmp_path / "s"]) == ["s/x:2"]


def test_package_imports_from_any_directory(tmp_path: Path) -> None:
    code = (
        "import duravip_lab, duravip_lab.bench, duravip_lab.scenario, duravip\n"
        "print(duravip_lab.__file__)\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    assert Path(p.stdout.strip()) == PKG / "__init__.py"


@pytest.mark.parametrize("module", ["duravip_lab", "duravip_lab.bench"])
def test_package_entry_points_run_with_dash_m(tmp_path: Path, module: str) -> None:
    p = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert p.returncode == 0 and "usage:" in p.stdout, p.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_help_from_any_directory(tmp_path: Path, script: str) -> None:
    p = subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), "--help"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 0 and "usage:" in p.stdout, p.stderr


def test_in_namespace_helpers_do_not_name_a_checkout_path() -> None:
    from duravip_lab import bench

    assert bench.keepalived_daemon_cmd() == (
        "{python} -m duravip_lab.bench keepalived-node {node} {dir}"
    )


def test_lab_modules_stay_under_500_lines() -> None:
    sizes = {f.name: len(f.read_text().splitlines()) for f in PKG.glob("*.py")}
    assert {"topology.py", "faults.py", "cluster.py", "config.py", "lab.py"} <= set(sizes)
    assert {n: s for n, s in sizes.items() if s >= 500} == {}
