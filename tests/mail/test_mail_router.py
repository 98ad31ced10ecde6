"""Binding assignment rules, group choice, rebind modes, routing."""

from __future__ import annotations

from ipaddress import IPv4Address

from hypothesis import given
from hypothesis import strategies as st

import duravip.mail.router as router
from duravip.config.model import (
    Binding,
    BindingGroup,
    ClusterConfig,
    Config,
    HostPort,
    Listener,
)


def hp(s: str) -> HostPort:
    h, p = s.split(":")
    return HostPort(IPv4Address(h), int(p))


def make_config() -> Config:
    return Config(
        cluster=ClusterConfig(name="c", node_name="n1", gossip_address=hp("10.0.0.1:4801")),
        listeners=(
            Listener(hp("10.1.1.1:25"), enable_duravip=True),
            Listener(hp("10.1.2.1:25"), duravip_follow="b1"),
            Listener(hp("10.1.2.2:25"), duravip_follow="10.1.3.2"),
            Listener(hp("10.0.0.1:25")),
        ),
        bindings=(
            Binding("b1", IPv4Address("10.1.3.1"), enable_duravip=True),
            Binding("b2", IPv4Address("10.1.3.2"), enable_duravip=True),
            Binding("ga", IPv4Address("10.1.4.1"), enable_duravip=True, group="pool"),
            Binding("gb", IPv4Address("10.1.4.2"), enable_duravip=True, group="pool"),
            Binding("gc", IPv4Address("10.1.4.3"), enable_duravip=True, group="pool"),
        ),
        groups=(BindingGroup("pool", ("ga", "gb", "gc")),),
    )


CFG = make_config()
MSG = b"From: a@x\r\nX-Binding: %s\r\nSubject: s\r\n\r\nX-Binding: b2\r\nbody\r\n"


def test_followed_binding_wins_over_header() -> None:
    assert router.requested_for(CFG, ("10.1.2.1", 25), MSG % b"b2") == "b1"


def test_follow_by_ip() -> None:
    assert router.requested_for(CFG, ("10.1.2.2", 25), b"\r\nbody") == "b2"


def test_header_names_binding_case_insensitively() -> None:
    assert router.requested_for(CFG, ("10.0.0.1", 25), MSG % b"B2") == "b2"


def test_header_names_group() -> None:
    assert router.requested_for(CFG, ("10.1.1.1", 25), MSG % b"pool") == "pool"


def test_unknown_header_or_none_is_default() -> None:
    assert router.requested_for(CFG, ("10.0.0.1", 25), MSG % b"nope") == "default"
    assert router.requested_for(CFG, ("10.0.0.1", 25), b"Subject: s\r\n\r\nbody\r\n") == "default"
    # Only the header section counts.
    body_only = b"Subject: s\r\n\r\nX-Binding: b1\r\n"
    assert router.requested_for(CFG, ("10.0.0.1", 25), body_only) == "default"


def test_group_prefers_a_locally_held_member() -> None:
    for key in ("k1", "k2", "k3", "k4"):
        assert router.resolve(CFG, "pool", held_here={"gb"}, key=key) == "gb"
    two = {router.resolve(CFG, "pool", held_here={"ga", "gc"}, key=f"k{i}") for i in range(50)}
    assert two == {"ga", "gc"}


@given(st.text(min_size=1, max_size=30))
def test_group_choice_is_stable_and_a_member(key: str) -> None:
    a = router.resolve(CFG, "pool", held_here=set(), key=key)
    assert a in {"ga", "gb", "gc"}
    assert router.resolve(CFG, "pool", held_here=set(), key=key) == a
    # A member held here always wins.
    assert router.resolve(CFG, "pool", held_here={"gc"}, key=key) == "gc"


def test_group_spreads_when_nothing_is_held() -> None:
    picks = {router.resolve(CFG, "pool", held_here=set(), key=f"id{i}") for i in range(100)}
    assert picks == {"ga", "gb", "gc"}


def test_plain_binding_and_default_resolve_to_themselves() -> None:
    assert router.resolve(CFG, "b1", held_here=set(), key="x") == "b1"
    assert router.resolve(CFG, "default", held_here={"b1"}, key="x") == "default"
    assert router.resolve(CFG, "gone", held_here=set(), key="x") == "default"


@given(
    held=st.sets(st.sampled_from(["ga", "gb", "gc"])),
    moved=st.sets(st.sampled_from(["ga", "gb", "gc", "b1"])),
    key=st.text(max_size=10),
)
def test_rebind_modes(held: set[str], moved: set[str], key: str) -> None:
    cur = "ga"
    full = router.reassign(
        CFG, requested="pool", current=cur, moved=moved, held_here=held, key=key, unconditional=True
    )
    assert full == router.resolve(CFG, "pool", held_here=held, key=key)
    partial = router.reassign(
        CFG,
        requested="pool",
        current=cur,
        moved=moved,
        held_here=held,
        key=key,
        unconditional=False,
    )
    if cur in moved:
        assert partial == full
    else:
        assert partial == cur


def test_rebind_drops_a_binding_removed_from_config() -> None:
    got = router.reassign(
        CFG,
        requested="old",
        current="old",
        moved=set(),
        held_here=set(),
        key="k",
        unconditional=False,
    )
    assert got == "default"


def test_route() -> None:
    holders = {"b1": "n1", "b2": "n2", "ga": None}
    assert router.route("default", holders, "n1") == ("local", None)
    assert router.route("b1", holders, "n1") == ("local", None)
    assert router.route("b2", holders, "n1") == ("move", "n2")
    assert router.route("ga", holders, "n1") == ("wait", None)
    assert router.route("static", holders, "n1") == ("local", None)


def test_group_of() -> None:
    assert router.group_of(CFG, "gb") == "pool"
    assert router.group_of(CFG, "b1") == "default"


@given(key=st.text(max_size=20))
def test_group_skips_members_nobody_holds(key: str) -> None:
    assert router.resolve(CFG, "pool", held_here=set(), key=key, available={"gb"}) == "gb"
    # Held here beats merely available; nothing available falls back to the hash over all.
    assert router.resolve(CFG, "pool", held_here={"gc"}, key=key, available={"gb", "gc"}) == "gc"
    assert router.resolve(CFG, "pool", held_here=set(), key=key, available=set()) in {
        "ga",
        "gb",
        "gc",
    }


_names = st.sampled_from(["Subject", "X-Binding", "x-binding", "From", "X-Bindings", "To"])
_values = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"),
    min_size=1,
    max_size=12,
)


@given(headers=st.lists(st.tuples(_names, _values, st.booleans()), max_size=6), body=_values)
def test_header_scan_agrees_with_the_email_parser(
    headers: list[tuple[str, str, bool]], body: str
) -> None:
    from email.parser import BytesHeaderParser
    from email.policy import compat32

    lines = []
    for name, value, folded in headers:
        lines.append(f"{name}: {value}\r\n\t{value}" if folded else f"{name}: {value}")
    data = ("\r\n".join(lines) + "\r\n\r\nX-Binding: body\r\n" + body).encode()
    ref = BytesHeaderParser(policy=compat32).parsebytes(data).get("X-Binding")
    want = None if ref is None else " ".join(str(ref).split()) or None
    got = router.header_binding(data)
    assert (None if got is None else " ".join(got.split())) == want
