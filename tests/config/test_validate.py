"""Every validation rule of SPEC section 2, each asserting where it points."""

from __future__ import annotations

import pytest

from duravip.config import CheckResult, SourceLoc, check_text

#: Lines 1-4: a valid cluster (gossip 10.0.0.1) with Topology 10.1.0.0/16 on eth1.
HEADER = """\
cluster { name = "t" node_name = "n1" gossip_address = "10.0.0.1:4801"
  keyring = "/k"
  Topology "10.1.0.0/16" { interface = "eth1" }
}
"""


def run(body: str) -> CheckResult:
    return check_text(HEADER + body, "v.conf")


def only(result: CheckResult, severity: str, fragment: str) -> SourceLoc | None:
    """The location of the one diagnostic of ``severity`` whose message holds ``fragment``."""
    found = [d for d in result.diagnostics if d.severity == severity and fragment in d.message]
    assert len(found) == 1, [str(d) for d in result.diagnostics]
    return found[0].loc


def loc(line: int, col: int) -> SourceLoc:
    return SourceLoc("v.conf", line, col)


def test_lab_config_is_clean(lab_n1: str) -> None:
    r = check_text(lab_n1, "n1.conf")
    assert r.ok and r.diagnostics == []


def test_header_is_clean() -> None:
    r = run("")
    assert r.ok and r.diagnostics == []


def test_duravip_on_gossip_address() -> None:
    r = check_text(
        'cluster { name = t gossip_address = "10.1.0.1:4801" keyring = /k\n'
        '  Topology "10.1.0.0/16" { interface = eth1 } }\n'
        "Binding b { Enable_Duravip = true Bind_Address = 10.1.0.1 }\n",
        "v.conf",
    )
    assert r.config is None
    assert only(r, "error", "gossip (main) address") == loc(3, 1)


def test_duravip_on_cluster_listener_address() -> None:
    r = run(
        'ECCluster_Listener { Listen "10.1.0.2:4802" { } }\n'
        'ESMTP_Listener { Listen "10.1.0.2:25" { Enable_Duravip = true } }\n'
    )
    assert only(r, "error", "ECCluster_Listener address") == loc(6, 18)


def test_duravip_on_metrics_address() -> None:
    r = run(
        'Metrics { Listen "10.1.0.3:9100" }\n'
        "Binding m { Enable_Duravip = yes Bind_Address = 10.1.0.3 }\n"
    )
    assert only(r, "error", "metrics listen address") == loc(6, 1)


def test_duravip_on_plain_listener_outside_topology() -> None:
    r = run(
        'ESMTP_Listener { Listen "10.9.0.5:25" { } }\n'
        "Binding m { Enable_Duravip = yes Bind_Address = 10.9.0.5 }\n"
    )
    assert only(r, "error", "plain listener 10.9.0.5:25") == loc(6, 1)
    assert only(r, "error", "no Topology block covers DuraVIP 10.9.0.5") == loc(6, 1)


def test_duravip_without_topology() -> None:
    r = run('ESMTP_Listener {\n  Listen "10.2.0.1:25" { Enable_Duravip = true }\n}\n')
    assert r.config is None
    assert only(r, "error", "no Topology block covers DuraVIP 10.2.0.1") == loc(6, 3)


def test_cidrmask_not_32_is_a_warning() -> None:
    r = check_text(
        "cluster { name = t gossip_address = 10.0.0.1:1 keyring = /k\n"
        '  Topology "10.1.0.0/16" { interface = eth1  cidrmask = "24" } }\n',
        "v.conf",
    )
    assert r.ok
    assert only(r, "warning", "cidrmask 24") == loc(2, 46)
    assert str(r.warnings[0]).startswith("v.conf:2:46: warning: cidrmask 24")


def test_cidrmask_out_of_range_is_an_error() -> None:
    r = check_text(
        "cluster { name = t gossip_address = 10.0.0.1:1 keyring = /k\n"
        '  Topology "10.1.0.0/16" { cidrmask = 33 interface = eth1 } }\n',
        "v.conf",
    )
    assert only(r, "error", "cidrmask must be 0..32") == loc(2, 28)


def test_topology_twice() -> None:
    r = check_text(HEADER[:-2] + 'Topology "10.1.0.0/16" { interface = eth2 } }\n', "v.conf")
    assert only(r, "error", "Topology 10.1.0.0/16 given twice") == loc(4, 1)


def test_listener_with_enable_and_follow() -> None:
    r = run(
        'ESMTP_Listener { Listen "10.1.2.1:25" {\n'
        '  Enable_Duravip = true\n  Duravip_Follow = "b" } }\n'
        "Binding b { Enable_Duravip = true Bind_Address = 10.1.1.1 }\n"
    )
    assert only(r, "error", "both Enable_Duravip and Duravip_Follow") == loc(7, 3)


def test_follow_of_missing_binding_has_hint() -> None:
    r = run(
        'ESMTP_Listener { Listen "10.1.2.1:25" { Duravip_Follow = "out-2" } }\n'
        "Binding out-1 { Enable_Duravip = true Bind_Address = 10.1.1.1 }\n"
    )
    assert only(r, "error", "names no binding 'out-2'") == loc(5, 41)
    (d,) = r.errors
    assert d.hint == "did you mean 'out-1'?"


def test_follow_of_listener_ip_is_not_a_binding() -> None:
    r = run(
        'ESMTP_Listener { Listen "10.1.2.1:25" { Duravip_Follow = "10.1.1.1" }\n'
        '  Listen "10.1.1.1:25" { Enable_Duravip = true } }\n'
    )
    assert only(r, "error", "names no binding '10.1.1.1'") == loc(5, 41)


def test_follow_of_non_duravip_binding() -> None:
    r = run(
        'ESMTP_Listener { Listen "10.1.2.1:25" { Duravip_Follow = "b" } }\n'
        "Binding b { Bind_Address = 10.1.1.1 }\n"
    )
    assert only(r, "error", "binding 'b' is not a DuraVIP") == loc(5, 41)


def test_follow_of_binding_on_same_ip() -> None:
    r = run(
        'ESMTP_Listener { listen "10.110.83.140:25" { duravip_follow = "example" } }\n'
        'binding "example" { enable_duravip = true bind_address = "10.110.83.140" }\n'
    )
    assert only(r, "error", "follows binding 'example' on its own IP") == loc(5, 46)


def test_preference_on_follow_listener_warns() -> None:
    r = run(
        'ESMTP_Listener { Listen "10.1.2.1:25" { Duravip_Follow = b\n'
        "  Duravip_Preference = n1 } }\n"
        "Binding b { Enable_Duravip = true Bind_Address = 10.1.1.1 }\n"
    )
    assert r.ok
    assert only(r, "warning", "that follows is ignored") == loc(6, 3)


def test_preference_on_enable_duravip_listener_warns() -> None:
    r = run(
        'ESMTP_Listener { Listen "10.1.1.1:25" { Enable_Duravip = yes Duravip_Preference = n1 } }\n'
    )
    assert r.ok
    assert only(r, "warning", "on Enable_Duravip listener") == loc(5, 62)
    assert (
        r.config is not None and r.config.duravips[next(iter(r.config.duravips))].preference == "n1"
    )


def test_preference_on_plain_listener_warns() -> None:
    r = run('ESMTP_Listener { Listen "10.0.0.1:25" { Duravip_Preference = n1 } }\n')
    assert only(r, "warning", "has no effect") == loc(5, 41)


def test_two_bindings_one_ip() -> None:
    r = run(
        "Binding a { Enable_Duravip = true Bind_Address = 10.1.1.1 }\n"
        "Binding b {\n  Bind_Address = 10.1.1.1 }\n"
    )
    assert only(r, "error", "share Bind_Address 10.1.1.1") == loc(7, 3)


def test_binding_name_twice_even_inside_group() -> None:
    r = run(
        "Binding a { Enable_Duravip = true Bind_Address = 10.1.1.1 }\n"
        'Binding_Group g {\n  Binding "A" { Enable_Duravip = true Bind_Address = 10.1.1.2 } }\n'
    )
    assert only(r, "error", "binding name 'A' used twice") == loc(7, 3)


def test_enable_duravip_binding_without_address() -> None:
    r = run("Binding a { Enable_Duravip = true }\n")
    assert only(r, "error", "no Bind_Address") == loc(5, 13)


def test_listener_given_twice() -> None:
    r = run(
        'ESMTP_Listener { Listen "10.0.0.1:25" { } }\nESMTP_Listener { Listen "10.0.0.1:25" }\n'
    )
    assert only(r, "error", "listener 10.0.0.1:25 given twice") == loc(6, 18)


def test_one_ip_following_two_bindings() -> None:
    r = run(
        'ESMTP_Listener { Listen "10.1.2.1:25" { Duravip_Follow = a }\n'
        '  Listen "10.1.2.1:587" { Duravip_Follow = b } }\n'
        "Binding a { Enable_Duravip = true Bind_Address = 10.1.1.1 }\n"
        "Binding b { Enable_Duravip = true Bind_Address = 10.1.1.2 }\n"
    )
    assert only(r, "error", "follows both 'a' and 'b'") == loc(6, 27)


def test_followed_ip_that_is_also_a_binding_address() -> None:
    r = run(
        'ESMTP_Listener { Listen "10.1.2.1:25" { Duravip_Follow = a } }\n'
        "Binding a { Enable_Duravip = true Bind_Address = 10.1.1.1 }\n"
        "Binding c { Enable_Duravip = true Bind_Address = 10.1.2.1 }\n"
    )
    assert only(r, "error", "also a binding's Bind_Address") == loc(5, 41)


def test_enable_duravip_listener_on_a_followed_ip() -> None:
    r = run(
        'ESMTP_Listener { Listen "10.1.2.1:25" { Duravip_Follow = a }\n'
        '  Listen "10.1.2.1:587" { Enable_Duravip = true } }\n'
        "Binding a { Enable_Duravip = true Bind_Address = 10.1.1.1 }\n"
    )
    assert only(r, "error", "manages it with Enable_Duravip") == loc(6, 27)


def test_plain_listener_on_followed_ip_is_upgraded_not_an_error() -> None:
    r = run(
        'ESMTP_Listener { Listen "10.1.2.1:25" { Duravip_Follow = a }\n'
        '  Listen "10.1.2.1:587" { } }\n'
        "Binding a { Enable_Duravip = true Bind_Address = 10.1.1.1 }\n"
    )
    assert r.ok, [str(d) for d in r.diagnostics]
    assert only(r, "info", "upgraded to DuraVIP") == loc(6, 3)


@pytest.mark.parametrize(
    ("keys", "line", "col", "fragment"),
    [
        ("probe_interval = 1 probe_timeout = 1", 5, 20, "probe_timeout (1.0s) must be shorter"),
        ("mtu = 500", 5, 1, "below the IPv4 minimum"),
        ('name = ""', 5, 1, "cluster name must not be empty"),
        ('node_name = ""', 5, 1, "node_name must not be empty"),
    ],
)
def test_cluster_value_rules(keys: str, line: int, col: int, fragment: str) -> None:
    text = 'cluster { gossip_address = "10.0.0.1:4801" keyring = "/k"\n\n\n\n' + keys + "\n}\n"
    if "name =" not in keys:
        text = text.replace("cluster {", "cluster { name = t node_name = n", 1)
    elif "node_name" in keys:
        text = text.replace("cluster {", "cluster { name = t", 1)
    else:
        text = text.replace("cluster {", "cluster { node_name = n", 1)
    r = check_text(text, "v.conf")
    assert only(r, "error", fragment) == loc(line, col)


def test_missing_keyring_warns() -> None:
    r = check_text("cluster { name = t gossip_address = 10.0.0.1:1 }", "v.conf")
    assert r.ok and only(r, "warning", "no keyring") == loc(1, 1)


def test_reserved_binding_name() -> None:
    r = run('Binding "#mmove" { }\n')
    assert only(r, "error", "is reserved") == loc(5, 1)


def test_group_given_twice() -> None:
    r = run("Binding_Group g { Binding a { } }\nBinding_Group G { Binding b { } }\n")
    assert only(r, "error", "Binding_Group 'G' given twice") == loc(6, 1)


def test_group_named_like_a_binding() -> None:
    r = run('Binding x { }\nBinding_Group "X" { Binding b { } }\n')
    assert only(r, "error", "has the name of a binding") == loc(6, 1)


def test_control_socket_world_access_warns_at_the_mode() -> None:
    r = run('Control_Listener { Listen "/run/d.sock" { mode = "0666" } }\n')
    assert only(r, "warning", "gives every local user access") == loc(5, 43)
    assert r.ok


def test_control_socket_group_write_without_group_warns() -> None:
    r = run('Control_Listener {\n  Listen "/run/d.sock" { mode = 0660 }\n}\n')
    assert only(r, "warning", "no group is set") == loc(6, 26)


def test_control_socket_group_needs_group_write_and_must_exist() -> None:
    r = run('Control_Listener { Listen "/run/d.sock" { group = "no-such-grp-dv" } }\n')
    assert only(r, "warning", "does not let it connect") == loc(5, 43)
    assert only(r, "warning", "does not exist on this host") == loc(5, 43)
    r = run('Control_Listener { Listen "/run/d.sock" { mode = "0660" group = "root" } }\n')
    assert r.ok and r.diagnostics == []
