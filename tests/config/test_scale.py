"""The 10,240-DuraVIP limit: a full-size config loads; one more is an error."""

from __future__ import annotations

from ipaddress import IPv4Address

from duravip.config import MAX_DURAVIPS, SourceLoc, check_text


def big_config(n: int) -> str:
    """Half DuraVIP listeners, half DuraVIP bindings, consecutive IPs in 10.128.0.0/9."""
    base = int(IPv4Address("10.128.0.0"))
    half = n // 2
    lines = [
        'cluster { name = "big" node_name = "n1" gossip_address = "10.0.0.1:4801" keyring = "/k"',
        '  Topology "10.128.0.0/9" { interface = "eth1" } }',
        "ESMTP_Listener {",
    ]
    lines += [
        f'  Listen "{IPv4Address(base + i)}:25" {{ Enable_Duravip = true }}' for i in range(half)
    ]
    lines.append("}")
    lines += [
        f'Binding "b{i}" {{ Enable_Duravip = true Bind_Address = "{IPv4Address(base + i)}" '
        f'Duravip_Preference = "n{i % 3}" }}'
        for i in range(half, n)
    ]
    return "\n".join(lines) + "\n"


def test_max_duravips_load() -> None:
    r = check_text(big_config(MAX_DURAVIPS), "big.conf")
    assert r.ok, [str(d) for d in r.errors[:3]]
    assert r.config is not None and len(r.config.duravips) == MAX_DURAVIPS
    assert r.config.duravips[IPv4Address("10.128.39.255")].binding == "b10239"


def test_one_more_is_an_error() -> None:
    r = check_text(big_config(MAX_DURAVIPS + 1), "big.conf")
    assert r.config is None
    (err,) = r.errors
    assert err.message == f"10241 DuraVIPs configured; at most {MAX_DURAVIPS} are supported"
    # The 10,241st DuraVIP in file order: the last binding (3 header lines + 5120 + "}").
    assert err.loc == SourceLoc("big.conf", 5 + MAX_DURAVIPS, 1)
