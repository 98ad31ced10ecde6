"""Shared fixtures: the netns lab (see docs/lab.md).

``lab_factory`` builds labs with names no other test run can collide with and
always tears them down; a session-wide safety net removes any namespace or
state directory this session created and something failed to remove.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

#: pid-derived, zero-padded so that "t0471" + counter never reads as another run's name.
LAB_PREFIX = f"t{os.getpid() % 1000:03d}"

_counter = itertools.count(1)
_created: list[str] = []


def _lab_module() -> Any:
    """The lab package, imported only by tests that use it (installed with ``.[test]``)."""
    import duravip_lab

    return duravip_lab


def _require_lab() -> None:
    if os.geteuid() != 0:
        pytest.skip("lab tests need root (network namespaces)")
    if shutil.which("ip") is None or shutil.which("nft") is None:
        pytest.skip("lab tests need iproute2 and nftables")


@pytest.fixture(scope="session")
def _lab_safety_net() -> Iterator[None]:
    """At session end, remove whatever a lab of this session left behind."""
    yield
    mod = _lab_module()
    for name in _created:
        try:
            mod.Lab(name).down()
        except mod.LabError as e:
            print(f"lab safety net: {name}: {e}", file=sys.stderr)
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        ns = line.split()[0] if line.strip() else ""
        if any(ns.startswith(f"{name}-") for name in _created):
            subprocess.run(["ip", "netns", "delete", ns], check=False)


@pytest.fixture
def lab_factory(_lab_safety_net: None) -> Iterator[Callable[..., Any]]:
    """``make(nodes=3, vips=3, profile="fast", daemon_cmd=None, **kw) -> Lab``, torn down after."""
    _require_lab()
    mod = _lab_module()
    labs: list[Any] = []

    def make(
        nodes: int = 3,
        vips: int = 3,
        profile: str = "fast",
        daemon_cmd: str | None = None,
        **kw: Any,
    ) -> Any:
        name = f"{LAB_PREFIX}{next(_counter)}"
        _created.append(name)
        lab = mod.Lab(name)
        labs.append(lab)
        return lab.up(nodes=nodes, vips=vips, profile=profile, daemon_cmd=daemon_cmd, **kw)

    try:
        yield make
    finally:
        errors = []
        for lab in labs:
            try:
                lab.down()
            except mod.LabError as e:
                errors.append(f"{lab.name}: {e}")
        if errors:
            pytest.fail("lab teardown failed: " + "; ".join(errors))
