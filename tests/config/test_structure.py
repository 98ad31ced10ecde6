"""Structuring: types, defaults, presets, case-insensitivity, derived DuraVIPs."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Literal

import pytest

from duravip.config import (
    PRESETS,
    Binding,
    CheckResult,
    ClusterConfig,
    ConfigError,
    DuraVip,
    HostPort,
    Listener,
    SourceLoc,
    Topology,
    check_text,
    loads,
)
from duravip.config.derive import derive
from duravip.config.parser import Assign, Stanza, parse
from duravip.config.reader import MISSING, StanzaReader, field_types, shape, suggest


def ip(s: str) -> IPv4Address:
    return IPv4Address(s)


def hp(s: str) -> HostPort:
    host, port = s.split(":")
    return HostPort(ip(host), int(port))


def errors(result: CheckResult) -> list[str]:
    return [str(d) for d in result.errors]


def test_lab_config_types(lab_n1: str) -> None:
    c = loads(lab_n1, "n1.conf")
    cl = c.cluster
    assert (cl.name, cl.node_name, cl.profile, cl.quorum) == ("dvl", "n1", "fast", "none")
    assert cl.gossip_address == hp("10.1.0.11:4801")
    assert cl.peers == (hp("10.1.0.12:4801"), hp("10.1.0.13:4801"))
    assert cl.keyring == Path("/tmp/dvl/keyring")
    assert cl.view_mature_time == 1.0 and cl.timers == PRESETS["fast"]
    assert cl.arp_all_hosts is True and cl.unconditional_rebind is True
    assert [(t.network, t.interface, t.cidrmask) for t in cl.topology] == [
        (IPv4Network("10.1.1.0/24"), "eth1", 32),
        (IPv4Network("10.1.2.0/24"), "eth1", 32),
    ]
    assert c.use_iflist_cache is False
    assert c.spool.path == Path("/tmp/dvl/n1/spool")
    assert c.control.path == Path("/tmp/dvl/n1/control.sock") and c.control.mode == 0o600
    assert c.cluster_listener == hp("10.1.0.11:4802")
    assert c.delivery.smarthost == hp("10.1.0.3:25")
    assert c.metrics.listen == hp("10.1.0.11:9100")
    assert [str(lst.address) for lst in c.listeners] == [
        "10.1.1.1:25",
        "10.1.1.2:25",
        "10.1.1.3:25",
        "10.1.2.1:25",
        "10.1.0.11:25",
    ]
    assert c.listeners[3].duravip_follow == "duravip-1" and not c.listeners[4].is_duravip
    assert [(b.name, b.group) for b in c.bindings] == [
        ("duravip-1", None),
        ("duravip-2", None),
        ("duravip-3", None),
        ("pool-a", "pool"),
        ("pool-b", "pool"),
    ]
    assert c.groups[0].name == "pool" and c.groups[0].bindings == ("pool-a", "pool-b")
    assert c.listeners[0].loc == SourceLoc("n1.conf", 22, 3)
    assert c.source == "n1.conf"


def test_lab_config_duravips(lab_n1: str) -> None:
    c = loads(lab_n1)
    assert c.duravips == {
        ip("10.1.1.1"): DuraVip(ip("10.1.1.1"), (25,), "duravip-1", "n1", None),
        ip("10.1.1.2"): DuraVip(ip("10.1.1.2"), (25,), "duravip-2", "n2", None),
        ip("10.1.1.3"): DuraVip(ip("10.1.1.3"), (25,), "duravip-3", "n3", None),
        ip("10.1.1.11"): DuraVip(ip("10.1.1.11"), (), "pool-a", None, None),
        ip("10.1.1.12"): DuraVip(ip("10.1.1.12"), (), "pool-b", None, None),
        ip("10.1.2.1"): DuraVip(ip("10.1.2.1"), (25,), None, None, "duravip-1"),
    }


def test_minimal_defaults() -> None:
    c = loads('cluster { name = x gossip_address = 10.0.0.1:4801 keyring = "/k" }')
    assert c.cluster.node_name == socket.gethostname()
    assert c.cluster.profile == "lan" and c.cluster.timers == PRESETS["lan"]
    assert c.cluster.peers == () and c.listeners == () and c.duravips == {}
    assert c.control.mode == 0o600 and c.metrics.listen is None and c.cluster_listener is None


def test_node_name_override_beats_config(lab_n1: str) -> None:
    assert loads(lab_n1, node_name="n7").cluster.node_name == "n7"


@pytest.mark.parametrize("profile", ["lan", "fast", "wan", "WAN"])
def test_profile_selects_preset(profile: str) -> None:
    c = loads(
        f'cluster {{ name = x gossip_address = 10.0.0.1:1 profile = {profile} keyring = "/k" }}'
    )
    assert c.cluster.timers == PRESETS[profile.lower()]


def test_timer_overrides_with_units() -> None:
    c = loads(
        "cluster { name = x gossip_address = 10.0.0.1:1 profile = fast keyring = /k\n"
        "  probe_interval = 200ms probe_timeout = 0.1 push_pull_interval = 2m\n"
        "  Indirect_Checks = 5 MTU = 1200 drain_timeout = 1.5s }"
    )
    t = c.cluster.timers
    assert t.probe_interval == pytest.approx(0.2) and t.probe_timeout == pytest.approx(0.1)
    assert t.push_pull_interval == 120.0 and t.indirect_checks == 5 and t.mtu == 1200
    assert t.suspicion_mult == PRESETS["fast"].suspicion_mult
    assert c.cluster.drain_timeout == 1.5


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True),
        ('"yes"', True),
        ("1", True),
        ("On", True),
        ('"false"', False),
        ("no", False),
        ("0", False),
        ("OFF", False),
    ],
)
def test_booleans(text: str, value: bool) -> None:
    c = loads(
        f"cluster {{ name = x gossip_address = 10.0.0.1:1 keyring = /k arp_all_hosts = {text} }}"
    )
    assert c.cluster.arp_all_hosts is value


def test_keys_and_stanzas_are_case_insensitive() -> None:
    c = loads(
        "CLUSTER { NAME = x Gossip_Address = 10.0.0.1:1 KEYRING = /k\n"
        '  topology "10.1.1.0/24" { INTERFACE = eth1 CIDRMASK = "32" } }\n'
        'esmtp_listener { LISTEN "10.1.1.1:25" { enable_duravip = TRUE } }\n'
        "binding b { BIND_ADDRESS = 10.1.1.1 eNaBlE_dUrAvIp = yes }\n"
        "control_listener { listen /run/x.sock { MODE = 640 } }\n"
        'metrics { listen "10.0.0.1:9100" { } }\n'
        "smtp_limits { max_recipients = 7 }\n"
    )
    assert c.cluster.topology[0].interface == "eth1"
    assert c.listeners[0].enable_duravip and c.bindings[0].enable_duravip
    assert c.control.mode == 0o640 and c.metrics.listen == hp("10.0.0.1:9100")
    assert c.smtp.max_recipients == 7


def test_upgrade_plain_services_on_a_duravip_ip() -> None:
    r = check_text(
        "cluster { name = x gossip_address = 10.0.0.1:1 keyring = /k\n"
        '  Topology "10.1.1.0/24" { interface = eth1 } }\n'
        'ESMTP_Listener { Listen "10.1.1.5:25" { Enable_Duravip = true }\n'
        '  Listen "10.1.1.5:587" { } }\n'
        "Binding plain { Bind_Address = 10.1.1.5 }\n",
        "u.conf",
    )
    assert r.config is not None, errors(r)
    assert r.config.listeners[1].enable_duravip and r.config.bindings[0].enable_duravip
    assert r.config.duravips[ip("10.1.1.5")] == DuraVip(ip("10.1.1.5"), (25, 587), "plain")
    infos = [d for d in r.diagnostics if d.severity == "info"]
    assert [d.loc for d in infos] == [SourceLoc("u.conf", 4, 3), SourceLoc("u.conf", 5, 1)]
    assert "upgraded" in infos[0].message


def test_follow_by_ip_stores_binding_name() -> None:
    c = loads(
        "cluster { name = x gossip_address = 10.0.0.1:1 keyring = /k\n"
        '  Topology "10.1.0.0/16" { interface = eth1 } }\n'
        'ESMTP_Listener { Listen "10.1.2.1:25" { Duravip_Follow = "10.1.1.1" } }\n'
        'Binding "Out-1" { Enable_Duravip = true Bind_Address = 10.1.1.1 Duravip_Preference = n2 }\n'
    )
    assert c.listeners[0].duravip_follow == "Out-1"
    assert c.duravips[ip("10.1.2.1")].follows == "Out-1"
    assert c.duravips[ip("10.1.1.1")].preference == "n2"


def test_follow_by_name_is_case_insensitive() -> None:
    c = loads(
        "cluster { name = x gossip_address = 10.0.0.1:1 keyring = /k\n"
        '  Topology "10.1.0.0/16" { interface = eth1 } }\n'
        'ESMTP_Listener { Listen "10.1.2.1:25" { Duravip_Follow = "OUT-1" } }\n'
        'Binding "out-1" { Enable_Duravip = true Bind_Address = 10.1.1.1 }\n'
    )
    assert c.duravips[ip("10.1.2.1")].follows == "out-1"


def test_metrics_listen_without_block() -> None:
    c = loads(
        "cluster { name = x gossip_address = 10.0.0.1:1 keyring = /k }\nMetrics { Listen 10.0.0.1:9100 }"
    )
    assert c.metrics.listen == hp("10.0.0.1:9100")


@pytest.mark.parametrize(
    ("body", "line", "col", "fragment", "hint"),
    [
        ("profle = fast", 2, 1, "unknown key 'profle' in cluster", "did you mean 'profile'?"),
        ("peers = 10.0.0.2", 2, 9, "expected ip:port", None),
        ("peers = 10.0.0.2:99999", 2, 9, "port must be 1..65535", None),
        ("peers = ( 10.0.0.2:1 bogus:1 )", 2, 22, "expected an IPv4 address", None),
        ("profile = fsat", 2, 11, "invalid value 'fsat' for 'profile'", "did you mean 'fast'?"),
        ("quorum = most", 2, 10, "invalid value 'most' for 'quorum'", None),
        ("arp_all_hosts = maybe", 2, 17, "expected a boolean", None),
        ("view_mature_time = soon", 2, 20, "expected a duration", None),
        ("indirect_checks = 2.5", 2, 19, "expected an integer", None),
        ("node_name = ( a b )", 2, 13, "takes a single value", None),
        ("name = y", 2, 1, "duplicate key 'name' in cluster", "first set at line 1 col 11"),
        (
            'Topolgy "10.1.1.0/24" { interface = e }',
            2,
            1,
            "unknown block 'Topolgy'",
            "did you mean 'Topology'?",
        ),
        ('Topology "10.1.1.1/24" { interface = e }', 2, 10, "host bits set", None),
        ('Topology "10.1.1.0/24" { }', 2, 1, "missing required key 'interface'", None),
        ("Topology { interface = e }", 2, 1, "'Topology' needs an argument", None),
        ("Topology = 1", 2, 1, "unknown key 'Topology'", "is a block"),
    ],
)
def test_cluster_errors(body: str, line: int, col: int, fragment: str, hint: str | None) -> None:
    text = f"cluster {{ name = x gossip_address = 10.0.0.1:1 keyring = /k\n{body}\n}}\n"
    r = check_text(text, "c.conf")
    assert r.config is None
    (diag,) = r.errors
    assert diag.loc == SourceLoc("c.conf", line, col), str(diag)
    assert fragment in diag.message, str(diag)
    if hint is not None:
        assert diag.hint is not None and hint in diag.hint


@pytest.mark.parametrize(
    ("text", "line", "col", "fragment"),
    [
        ("", 1, 1, "missing 'cluster' block"),
        ("cluster { name = x }", 1, 1, "missing required key 'gossip_address'"),
        ("cluster { gossip_address = 10.0.0.1:1 }", 1, 1, "missing required key 'name'"),
        ("BASE\nclustre { }", 2, 1, "unknown block 'clustre'"),
        ("BASE\nuse_iflist_cach = true", 2, 1, "unknown key 'use_iflist_cach'"),
        ("BASE\ncluster { }", 2, 1, "'cluster' given twice"),
        ('BASE\nSpool { path = "" }', 2, 16, "expected a file system path"),
        ("BASE\nSpool x { }", 2, 7, "'Spool' takes no argument"),
        ("BASE\nControl_Listener { Listen /x { mode = 999 } }", 2, 39, "octal file mode"),
        ("BASE\nControl_Listener { }", 2, 1, "needs a Listen"),
        ("BASE\nECCluster_Listener { Listen 10.0.0.1 }", 2, 29, "expected ip:port"),
        (
            "BASE\nECCluster_Listener { Listen 10.0.0.1:1 { x = 1 } }",
            2,
            42,
            "unknown key 'x' in Listen",
        ),
        ("BASE\nMetrics { Listen 10.0.0.1:1 Listen 10.0.0.1:2 }", 2, 29, "'Listen' given twice"),
        ("BASE\nDelivery { smarthost = 10.0.0.3 }", 2, 24, "expected ip:port"),
        ("BASE\nDelivery { retry_bse = 1 }", 2, 12, "unknown key 'retry_bse' in Delivery"),
        (
            "BASE\nESMTP_Listener { Listen 10.1.1.1:25 { Enable_Duravp = 1 } }",
            2,
            39,
            "unknown key 'Enable_Duravp'",
        ),
        ("BASE\nESMTP_Listener { Lisen 10.1.1.1:25 { } }", 2, 18, "unknown block 'Lisen'"),
        ("BASE\nBinding { }", 2, 1, "'Binding' needs an argument"),
        ('BASE\nBinding "" { }', 2, 9, "binding name must not be empty"),
        ("BASE\nBinding b { Bind_Adress = 10.1.1.1 }", 2, 13, "unknown key 'Bind_Adress'"),
        ("BASE\nBinding b { Bind_Address = 10.1.1 }", 2, 28, "expected an IPv4 address"),
        ("BASE\nBinding_Group g { Bindng b { } }", 2, 19, "unknown block 'Bindng'"),
    ],
)
def test_structure_errors(text: str, line: int, col: int, fragment: str) -> None:
    text = text.replace("BASE", "cluster { name = x gossip_address = 10.0.0.1:1 keyring = /k }")
    r = check_text(text, "s.conf")
    assert r.config is None
    assert any(fragment in d.message for d in r.errors), errors(r)
    (diag,) = [d for d in r.errors if fragment in d.message]
    assert diag.loc == SourceLoc("s.conf", line, col), str(diag)


def test_every_error_is_reported_at_once() -> None:
    text = "cluster { name = x gossip_address = 10.0.0.1:1 profle = a\n quorm = b }\nfoo { }\n"
    with pytest.raises(ConfigError) as info:
        loads(text, "m.conf")
    assert [str(d.loc) for d in info.value.errors] == ["m.conf:1:48", "m.conf:2:2", "m.conf:3:1"]
    assert "and 2 more errors" in str(info.value)


# ------------------------------------------------ derive: the derived DuraVIPs


def _cluster(*nets: str) -> ClusterConfig:
    return ClusterConfig(
        name="c",
        node_name="n1",
        gossip_address=hp("10.1.0.11:4801"),
        topology=tuple(Topology(network=IPv4Network(n), interface="eth1") for n in nets),
    )


def test_derive_upgrades_plain_services_only_inside_a_topology_and_not_held() -> None:
    loc = SourceLoc("t", 3, 1)
    listeners = [
        Listener(hp("10.1.1.1:25"), enable_duravip=True, duravip_preference="n2"),
        Listener(hp("10.1.1.1:587"), loc=loc),  # same IP, plain: upgraded
        Listener(hp("10.9.0.1:25"), enable_duravip=True),  # outside any Topology
        Listener(hp("10.9.0.1:587")),  # not upgradable: stays plain
        Listener(hp("10.1.1.5:25")),  # held by the node itself
    ]
    bindings = [
        Binding("out", bind_address=ip("10.1.1.1"), duravip_preference="n3"),
        Binding("mine", bind_address=ip("10.1.1.5"), enable_duravip=True),
    ]
    got_l, got_b, vips, notes = derive(listeners, bindings, _cluster("10.1.1.0/24"), {ip("10.1.1.5")})
    assert [lst.enable_duravip for lst in got_l] == [True, True, True, False, False]
    assert [b.enable_duravip for b in got_b] == [True, True]
    assert list(vips) == [ip("10.1.1.1"), ip("10.1.1.5"), ip("10.9.0.1")]  # sorted by value
    assert vips[ip("10.1.1.1")] == DuraVip(
        ip=ip("10.1.1.1"), listener_ports=(25, 587), binding="out", preference="n3", follows=None
    )  # a binding's preference wins over a listener's
    assert vips[ip("10.9.0.1")].listener_ports == (25,)
    assert vips[ip("10.1.1.5")].listener_ports == () and vips[ip("10.1.1.5")].binding == "mine"
    assert [(d.severity, d.loc) for d in notes] == [("info", loc), ("info", None)]
    assert "listener 10.1.1.1:587 upgraded" in notes[0].message
    assert "binding 'out' upgraded" in notes[1].message


def test_derive_resolves_follow_by_name_or_ip_and_leaves_unknown_targets() -> None:
    listeners = [
        Listener(hp("10.1.1.1:25"), duravip_follow="OUT"),
        Listener(hp("10.1.1.2:25"), duravip_follow="10.1.1.9"),
        Listener(hp("10.1.1.3:25"), duravip_follow="nobody"),
    ]
    bindings = [Binding("out", bind_address=ip("10.1.1.9"))]
    got_l, _, vips, _ = derive(listeners, bindings, _cluster(), set())
    assert [lst.duravip_follow for lst in got_l] == ["out", "out", "nobody"]
    assert vips[ip("10.1.1.1")].follows == "out" and vips[ip("10.1.1.3")].follows == "nobody"
    assert ip("10.1.1.9") not in vips  # the binding is not a DuraVIP itself


# ------------------------------------------ reader: generic values and blocks


def _block(text: str) -> Stanza:
    [st] = parse(text, "t").items
    assert isinstance(st, Stanza)
    return st


def test_reader_converts_typed_values_and_records_where_they_were() -> None:
    r = StanzaReader()
    keys = {"port": int, "names": tuple[str, ...], "mode": int, "kind": Literal["a", "b"]}
    values, subs = r.section(
        _block('X { port = 25 names = ( "a" "b" ) mode = "0640" kind = B Sub { } }'),
        keys,
        ("Sub",),
        ("x",),
    )
    assert values == {"port": 25, "names": ("a", "b"), "mode": 0o640, "kind": "b"}
    assert [s.name for s in subs] == ["Sub"] and r.diags == []
    assert r.locs[("x", "port")] == SourceLoc("t", 1, 5)


def test_reader_reports_every_problem_with_a_hint() -> None:
    r = StanzaReader()
    keys = {"port": int, "kind": Literal["alpha", "beta"]}
    values, subs = r.section(
        _block("X { prot = 1 port = x kind = alhpa kind = beta Listen = 1 port { } }"),
        keys,
        ("Listen",),
        (),
    )
    assert values == {} and subs == []
    assert [(d.severity, d.message, d.hint) for d in r.diags] == [
        ("error", "unknown key 'prot' in X", "did you mean 'port'?"),
        ("error", "invalid value for 'port': expected an integer, got 'x'", None),
        ("error", "invalid value 'alhpa' for 'kind'", "did you mean 'alpha'?"),
        ("error", "duplicate key 'kind' in X", "first set at line 1 col 23"),
        ("error", "unknown key 'Listen' in X", "'Listen' is a block: write Listen ... { }"),
        ("error", "unknown block 'port' in X", "'port' is a key: write port = value"),
    ]


def test_reader_checks_block_shapes() -> None:
    r = StanzaReader()
    assert r.want_block(_block('X "arg" { }'), arg=True)
    assert not r.want_block(_block("X { }"), arg=True)
    assert not r.want_block(_block('X "arg" { }'), arg=False)
    twice = [_block("X { }"), _block("X { }")]
    assert r.single(twice, "X") is twice[0] and r.single([], "X") is None
    assert [d.message for d in r.diags] == [
        "'X' needs an argument",
        "'X' takes no argument",
        "'X' given twice",
    ]
    body = _block('X { k = ( "1" "y" ) }').body
    assert body is not None
    [assign] = body
    assert isinstance(assign, Assign)
    assert r.convert(assign.value, tuple[int, ...], "k") is MISSING  # one bad item: all of it
    assert r.diags[-1].message == "invalid value for 'k': expected an integer, got 'y'"


def test_suggest_names_the_closest_or_lists_the_choices() -> None:
    assert suggest("Enable_Duravp", ["Enable_Duravip", "Duravip_Follow"]) == (
        "did you mean 'Enable_Duravip'?"
    )
    assert suggest("zzz", ["b", "A"]) == "expected one of: A, b"
    assert suggest("zzz", []) is None


def test_shape_of_field_types() -> None:
    assert shape(tuple[int, ...])[:2] == ("tuple", int)
    assert shape(Literal["x", "y"])[:2] == ("literal", ("x", "y"))
    kind, tp, hook = shape(int | None)
    assert (kind, tp) == ("scalar", int) and hook("7", int) == 7
    assert "loc" not in field_types(Listener) and field_types(Listener)["address"] is HostPort
