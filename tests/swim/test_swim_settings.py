"""The SWIM package owns its settings and depends on no other duravip package."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import attrs

from duravip.config import model
from duravip.swim.core import Swim
from duravip.swim.crypto import Keyring
from duravip.swim.settings import Timers

SWIM_SRC = Path(__file__).resolve().parents[2] / "src" / "duravip" / "swim"


def duravip_imports(path: Path) -> set[str]:
    """Every ``duravip.*`` module ``path`` imports, anywhere (TYPE_CHECKING included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("duravip")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("duravip"):
            out.add(node.module or "")
    return out


def test_swim_imports_nothing_of_duravip_but_itself() -> None:
    files = sorted(SWIM_SRC.glob("*.py"))
    assert len(files) > 10
    outside = {
        f.name: sorted(m for m in duravip_imports(f) if not m.startswith("duravip.swim"))
        for f in files
    }
    assert {k: v for k, v in outside.items() if v} == {}


def test_the_config_package_uses_the_cores_settings_class() -> None:
    assert model.Timers is Timers
    assert all(type(t) is Timers for t in model.PRESETS.values())
    assert attrs.fields_dict(model.ClusterConfig)["timers"].default is model.PRESETS["lan"]


def test_new_settings_apply_to_a_running_core() -> None:
    t = Timers(0.4, 0.2, 3, 4, 1.5, 6.0, 0.1, 3, 30.0, 8, 30.0, 30.0)
    s = Swim(
        name="x",
        addr=("10.0.0.1", 4801),
        cluster="c",
        timers=t,
        keyring=Keyring.generate(),
        rng=random.Random(1),
    )
    s.awareness.score = 7
    s.set_timers(attrs.evolve(t, awareness_max_multiplier=3, probe_interval=2.0))
    assert s.timers.probe_interval == 2.0
    assert s.awareness.score == 2  # clamped to the new ceiling at once
