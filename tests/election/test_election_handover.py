"""Break-before-make planning."""

from __future__ import annotations

from duravip.election import plan, resolve

from .strategies import IPS, uniform_claims, view

IP1, IP2 = IPS[0], IPS[1]


def decisions(owner: str):
    vips = uniform_claims([IP1, IP2], pref={IP1: owner, IP2: owner})
    views = {n: view(n, vips) for n in ("a", "b", "c")}
    return resolve(views, "abc"), vips


def test_take_free_ip_and_wait_for_live_holder():
    dec, vips = decisions("a")
    views = {"b": view("b", vips, held=frozenset({IP1}))}
    p = plan(local="a", decisions=dec, held=frozenset(), views=views, states={"b": "alive"})
    assert p.acquire == {IP2}
    assert p.waiting == {IP1: "b"}
    # suspicion alone still blocks
    p = plan(local="a", decisions=dec, held=frozenset(), views=views, states={"b": "suspect"})
    assert p.waiting == {IP1: "b"}


def test_take_at_once_from_dead_or_left_holder():
    dec, vips = decisions("a")
    views = {"b": view("b", vips, held=frozenset({IP1}))}
    for state in ("dead", "left"):
        p = plan(local="a", decisions=dec, held=frozenset(), views=views, states={"b": state})
        assert p.acquire == {IP1, IP2}
        assert p.from_dead == {IP1: "b"}


def test_non_owner_releases_owner_keeps_when_both_hold():
    dec, vips = decisions("a")
    both = frozenset({IP1, IP2})
    views = {"a": view("a", vips, held=both), "b": view("b", vips, held=both)}
    states = {"a": "alive", "b": "alive"}
    pb = plan(local="b", decisions=dec, held=both, views=views, states=states)
    assert pb.release == both and not pb.acquire
    pa = plan(local="a", decisions=dec, held=both, views=views, states=states)
    assert not pa.release and not pa.acquire


def test_release_ips_no_longer_decided():
    p = plan(local="a", decisions={}, held=frozenset({IP1}), views={}, states={})
    assert p.release == {IP1}
