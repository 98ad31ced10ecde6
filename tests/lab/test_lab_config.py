"""The lab's generated configs: content, the status scanner, the real parser, docs/examples.

No namespaces here, so no root and no ``lab`` mark.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from duravip_lab import (
    LabSpec,
    main,
    node_ip,
    render_config,
    scan_config,
    vip_ip,
)
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[2]
STATE = Path("/run/duravip-lab/dvl")


@settings(max_examples=60, deadline=None)
@given(nodes=st.integers(1, 40), vips=st.integers(1, 100), data=st.data())
def test_scan_reads_back_what_render_wrote(nodes: int, vips: int, data: st.DataObject) -> None:
    i = data.draw(st.integers(1, nodes))
    text = render_config(LabSpec("dvl", nodes, vips), i, STATE)
    got = scan_config(text)
    want_bindings = {f"duravip-{k}": vip_ip(k) for k in range(1, vips + 1)}
    want_bindings |= {"pool-a": "10.1.1.101", "pool-b": "10.1.1.102"}
    assert got["bindings"] == want_bindings
    assert got["vips"] == {*want_bindings.values(), "10.1.2.1"}
    assert got["listeners"][f"{node_ip(i)}:25"] == {"duravip": False, "follow": None}
    assert got["listeners"]["10.1.2.1:25"] == {"duravip": False, "follow": "duravip-1"}
    assert len(got["listeners"]) == vips + 2
    # preferences go round the nodes; peers are everyone but me
    for k in range(1, vips + 1):
        assert (
            f'Bind_Address = "{vip_ip(k)}"  Duravip_Preference = "n{(k - 1) % nodes + 1}"' in text
        )
    peers_line = next(line for line in text.splitlines() if "peers =" in line)
    assert f'"{node_ip(i)}:4801"' not in peers_line
    assert peers_line.count(":4801") == nodes - 1


def test_scan_ignores_comments_and_other_listeners() -> None:
    text = (
        'ECCluster_Listener { Listen "10.1.0.11:4802" { } }\n'
        '# Binding "ghost" { Enable_Duravip = true Bind_Address = "10.1.1.9" }\n'
        'ESMTP_Listener {\n  Listen "10.1.1.7:587" { enable_duravip = yes }\n}\n'
    )
    got = scan_config(text)
    assert got == {
        "bindings": {},
        "listeners": {"10.1.1.7:587": {"duravip": True, "follow": None}},
        "vips": {"10.1.1.7"},
    }


@pytest.mark.parametrize(("nodes", "vips"), [(3, 3), (1, 1), (7, 100)])
def test_generated_configs_pass_the_real_parser(nodes: int, vips: int) -> None:
    loader = pytest.importorskip("duravip.config.loader")
    spec = LabSpec("dvl", nodes, vips, profile="lan", quorum="majority")
    for i in {1, nodes}:
        text = render_config(spec, i, STATE)
        res = loader.check_text(text, f"n{i}.conf")
        assert res.ok, "\n".join(str(d) for d in res.diagnostics)
        cfg = res.config
        assert cfg.cluster.node_name == f"n{i}"
        assert {str(ip) for ip in cfg.duravips} == scan_config(text)["vips"]
        assert {b.name: str(b.bind_address) for b in cfg.bindings} == scan_config(text)["bindings"]


def test_docs_examples_are_current(tmp_path: Path) -> None:
    assert main(["gen-configs", "--name", "dvl", str(tmp_path)]) == 0
    for n in ("n1", "n2", "n3"):
        assert (REPO / "docs" / "examples" / f"{n}.conf").read_text() == (
            tmp_path / f"{n}.conf"
        ).read_text(), (
            f"docs/examples/{n}.conf is stale: run netns-lab/lab gen-configs docs/examples"
        )
