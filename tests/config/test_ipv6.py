"""IPv6 DuraVIPs in the config: syntax, the same validation rules, both families mixed."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

from duravip.config import CheckResult, HostPort, SourceLoc, check_text, to_jsonable

#: Lines 1-5: a dual-stack cluster: gossip on IPv6, Topology blocks for both families.
HEADER = """\
cluster { name = "t" node_name = "n1" gossip_address = "[2001:db8::11]:4801"
  keyring = "/k"
  Topology "10.1.0.0/16" { interface = "eth1" }
  Topology "2001:db8:1::/64" { interface = "eth1" }
}
"""


def run(body: str, header: str = HEADER) -> CheckResult:
    return check_text(header + body, "v6.conf")


def errors(r: CheckResult) -> list[str]:
    return [f"{d.loc}: {d.message}" for d in r.diagnostics if d.severity == "error"]


def only(r: CheckResult, severity: str, fragment: str) -> SourceLoc | None:
    found = [d for d in r.diagnostics if d.severity == severity and fragment in d.message]
    assert len(found) == 1, [str(d) for d in r.diagnostics]
    return found[0].loc


def loc(line: int, col: int) -> SourceLoc:
    return SourceLoc("v6.conf", line, col)


def test_dual_stack_config_structures() -> None:
    r = run(
        "ESMTP_Listener {\n"
        '  Listen "[2001:db8:1::1]:25" { Enable_Duravip = true }\n'
        '  Listen "10.1.1.1:25" { Duravip_Follow = "v6" }\n'
        '  Listen "[2001:db8:1::2]:25" { Duravip_Follow = "v4" }\n'
        "}\n"
        'Binding "v6" { Enable_Duravip = true Bind_Address = "2001:db8:1::1" }\n'
        'Binding "v4" { Enable_Duravip = true Bind_Address = "10.1.1.9" }\n'
    )
    assert r.ok, errors(r)
    assert r.config is not None
    c = r.config
    v6 = ip_address("2001:db8:1::1")
    assert c.cluster.gossip_address == HostPort(ip_address("2001:db8::11"), 4801)
    assert str(c.cluster.gossip_address) == "[2001:db8::11]:4801"
    assert c.cluster.gossip_address.as_tuple() == ("2001:db8::11", 4801)
    topo = c.topology_for(v6)
    assert topo is not None and topo.network == ip_network("2001:db8:1::/64")
    assert topo.cidrmask == 128  # the IPv6 default is the host length
    v4topo = c.topology_for(ip_address("10.1.1.1"))
    assert v4topo is not None and v4topo.cidrmask == 32
    assert set(c.duravips) == {
        v6,
        ip_address("2001:db8:1::2"),
        ip_address("10.1.1.1"),
        ip_address("10.1.1.9"),
    }
    assert c.duravips[v6].listener_ports == (25,)
    assert c.duravips[v6].binding == "v6"
    assert c.duravips[ip_address("10.1.1.1")].follows == "v6"
    assert c.duravips[ip_address("2001:db8:1::2")].follows == "v4"
    js = to_jsonable(c)
    assert "2001:db8:1::/64" in str(js)


def test_ipv6_needs_brackets_with_a_port() -> None:
    r = run('ESMTP_Listener { Listen "2001:db8:1::1:25" { Enable_Duravip = true } }\n')
    assert only(r, "error", "[address]:port") == loc(6, 25)


def test_bad_ipv6_address_points_at_it() -> None:
    r = run('Binding b { Enable_Duravip = true Bind_Address = "2001:db8:1::zz" }\n')
    assert only(r, "error", "or an IPv6 address") is not None
    assert errors(r)[0].startswith("v6.conf:6:")


def test_ipv6_duravip_outside_topology() -> None:
    r = run('Binding b { Enable_Duravip = true Bind_Address = "2001:db8:2::1" }\n')
    assert only(r, "error", "no Topology block covers DuraVIP 2001:db8:2::1") == loc(6, 1)


def test_ipv6_duravip_on_main_address() -> None:
    r = run(
        'Binding b { Enable_Duravip = true Bind_Address = "2001:db8::11" }\n',
        HEADER.replace('"2001:db8:1::/64"', '"2001:db8::/64"'),
    )
    assert only(r, "error", "gossip (main) address") == loc(6, 1)


def test_ipv4_address_is_not_covered_by_an_ipv6_topology() -> None:
    header = HEADER.replace('  Topology "10.1.0.0/16" { interface = "eth1" }\n', "")
    r = run('Binding b { Enable_Duravip = true Bind_Address = "10.1.1.1" }\n', header)
    assert only(r, "error", "no Topology block covers DuraVIP 10.1.1.1") == loc(5, 1)


def test_ipv6_cidrmask_range_and_warning() -> None:
    header = HEADER.replace(
        '"2001:db8:1::/64" { interface', '"2001:db8:1::/64" { cidrmask = 129 interface'
    )
    assert only(run("", header), "error", "cidrmask must be 0..128, got 129") == loc(4, 32)
    header = HEADER.replace(
        '"2001:db8:1::/64" { interface', '"2001:db8:1::/64" { cidrmask = 64 interface'
    )
    assert only(run("", header), "warning", "DuraVIPs should be /128") == loc(4, 32)
    header = HEADER.replace('"10.1.0.0/16" { interface', '"10.1.0.0/16" { cidrmask = 33 interface')
    assert only(run("", header), "error", "cidrmask must be 0..32, got 33") is not None


def test_ipv6_topology_host_bits() -> None:
    header = HEADER.replace('"2001:db8:1::/64"', '"2001:db8:1::1/64"')
    assert only(run("", header), "error", "has host bits set") == loc(4, 12)


def test_ipv4_compatible_ipv6_is_refused() -> None:
    header = HEADER.replace('"2001:db8:1::/64"', '"::/64"')
    r = run('Binding b { Enable_Duravip = true Bind_Address = "::a01:101" }\n', header)
    assert only(r, "error", "IPv4-compatible") is not None


def test_limit_counts_both_families() -> None:
    lines = ["ESMTP_Listener {"]
    lines += [
        f'  Listen "10.1.{i // 250}.{i % 250 + 1}:25" {{ Enable_Duravip = true }}'
        for i in range(5120)
    ]
    lines += [
        f'  Listen "[2001:db8:1::{i + 1:x}]:25" {{ Enable_Duravip = true }}' for i in range(5121)
    ]
    lines.append("}")
    r = run("\n".join(lines) + "\n")
    assert only(r, "error", "10241 DuraVIPs configured; at most 10240") is not None
    lines.pop(-2)
    r = run("\n".join(lines) + "\n")
    assert r.ok, errors(r)[:3]
