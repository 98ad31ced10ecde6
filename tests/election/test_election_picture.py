"""The cluster picture (no trio): view decoding, rejoin, re-announce, holders."""

from __future__ import annotations

from ipaddress import IPv4Address

from duravip.config import HostPort
from duravip.election import Decision, NodeView, VipClaim, encode
from duravip.election.picture import (
    ClusterSnapshot,
    ViewTracker,
    binding_holders,
    handed_off,
    holders_by_ip,
    mmove_peers,
    reannounce_targets,
)
from duravip.swim.members import Member, State

A, B, C = IPv4Address("10.1.1.1"), IPv4Address("10.1.1.2"), IPv4Address("10.1.1.3")
CLAIMS = {ip: VipClaim(listener_ports=(25,)) for ip in (A, B, C)}


def view(
    node: str,
    *,
    held: frozenset[IPv4Address] = frozenset(),
    mature: bool = True,
    version: int = 1,
    mmove: HostPort | None = None,
) -> NodeView:
    return NodeView(
        node=node, version=version, mature=mature, held=held, vips=CLAIMS, mmove_addr=mmove
    )


def member(
    name: str,
    state: State = State.ALIVE,
    v: NodeView | None = None,
    *,
    meta_version: int = 1,
    current: bool = True,
    meta: bytes | None = None,
) -> Member:
    raw = meta if meta is not None else (encode(v) if v is not None else b"")
    return Member(
        name=name,
        addr=("127.0.0.1", 4800),
        state=state,
        incarnation=1,
        meta=raw,
        meta_version=meta_version,
        state_since=0.0,
        meta_current=current,
    )


def members(*ms: Member) -> dict[str, Member]:
    return {m.name: m for m in ms}


def decision(owner: str | None) -> Decision:
    return Decision(owner=owner, states=frozenset(), candidates=(), reason="test")


# ------------------------------------------------------------ ViewTracker


def test_views_decoded_once_per_meta_version() -> None:
    t = ViewTracker("n1")
    first = t.update(members(member("n2", v=view("n2"))), frozenset())
    assert first.views_changed and first.snapshot.views["n2"].node == "n2"
    assert first.snapshot.states == {"n2": State.ALIVE}
    again = t.update(members(member("n2", v=view("n2"))), frozenset())
    assert not again.views_changed
    assert again.snapshot.views["n2"] is first.snapshot.views["n2"]
    bumped = t.update(members(member("n2", v=view("n2", version=2), meta_version=2)), frozenset())
    assert bumped.views_changed and bumped.snapshot.views["n2"].version == 2


def test_member_without_meta_has_a_state_and_no_view() -> None:
    up = ViewTracker("n1").update(members(member("n2")), frozenset())
    assert up.snapshot.states == {"n2": State.ALIVE} and up.snapshot.views == {}
    assert not up.views_changed and not up.reannounce and up.dropped == ()


def test_undecodable_view_is_counted_and_skipped_every_time() -> None:
    t = ViewTracker("n1")
    bad = members(member("n2", meta=b"not a view"), member("n3", v=view("n3")))
    up = t.update(bad, frozenset())
    assert [d.node for d in up.dropped] == ["n2"] and up.dropped[0].error
    assert "n2" not in up.snapshot.views and "n3" in up.snapshot.views
    assert up.snapshot.states["n2"] == State.ALIVE
    # Not cached: the same bad bytes are reported again (the counter keeps rising).
    assert [d.node for d in t.update(bad, frozenset()).dropped] == ["n2"]


def test_rejoining_view_is_immature_until_its_current_view_arrives() -> None:
    t = ViewTracker("n1")
    old = view("n2", mature=True)
    assert t.update(members(member("n2", v=old)), frozenset()).snapshot.views["n2"].mature
    t.update(members(member("n2", State.DEAD, v=old)), frozenset())
    # Back, but the announced newer view is still being fetched: the cached
    # mature view is a previous run's; its claims count, its candidacy waits.
    up = t.update(members(member("n2", v=old, current=False)), frozenset())
    assert up.reannounce  # a heal: clients may hold stale ARP entries
    assert up.snapshot.views["n2"].mature is False
    assert up.snapshot.views["n2"].held == old.held
    still = t.update(members(member("n2", v=old, current=False)), frozenset())
    assert still.snapshot.views["n2"].mature is False and not still.reannounce
    fresh = view("n2", mature=True, version=2)
    done = t.update(members(member("n2", v=fresh, meta_version=2)), frozenset())
    assert done.snapshot.views["n2"].mature is True


def test_a_node_never_gone_is_not_marked_immature_while_fetching() -> None:
    t = ViewTracker("n1")
    t.update(members(member("n2", v=view("n2"))), frozenset())
    up = t.update(members(member("n2", State.SUSPECT, v=view("n2"), current=False)), frozenset())
    assert up.snapshot.views["n2"].mature and not up.reannounce


def test_left_then_alive_asks_for_a_reannounce() -> None:
    t = ViewTracker("n1")
    t.update(members(member("n2", State.LEFT, v=view("n2"))), frozenset())
    assert t.update(members(member("n2", v=view("n2"))), frozenset()).reannounce


def test_rival_claim_and_release_of_an_ip_we_hold_trigger_reannounce() -> None:
    t = ViewTracker("n1")
    mine = frozenset({A})
    assert not t.update(members(member("n2", v=view("n2"))), mine).reannounce
    claim = t.update(members(member("n2", v=view("n2", held=mine, version=2), meta_version=2)), mine)
    assert claim.reannounce
    release = t.update(members(member("n2", v=view("n2", version=3), meta_version=3)), mine)
    assert release.reannounce
    # Changes about IPs we do not hold, and our own view, do not.
    other = t.update(members(member("n2", v=view("n2", held=frozenset({B}), version=4), meta_version=4)), mine)
    assert not other.reannounce
    own = t.update(members(member("n1", v=view("n1", held=mine))), mine)
    assert not own.reannounce


def test_forgotten_member_is_dropped_from_the_snapshot() -> None:
    t = ViewTracker("n1")
    t.update(members(member("n2", v=view("n2")), member("n3", v=view("n3"))), frozenset())
    up = t.update(members(member("n3", v=view("n3"))), frozenset())
    assert set(up.snapshot.views) == {"n3"} and set(up.snapshot.states) == {"n3"}


# ------------------------------------------------------------ pure helpers


def snapshot(states: dict[str, State], held: dict[str, frozenset[IPv4Address]], local: str = "n1") -> ClusterSnapshot:
    return ClusterSnapshot(
        local=local, states=states, views={n: view(n, held=h) for n, h in held.items()}
    )


def test_holders_by_ip_lists_live_holders_sorted_by_name() -> None:
    snap = snapshot(
        {"n3": State.ALIVE, "n1": State.SUSPECT, "n2": State.DEAD, "n4": State.LEFT},
        {"n3": frozenset({A}), "n1": frozenset({A, B}), "n2": frozenset({A}), "n4": frozenset({C})},
    )
    assert holders_by_ip(snap) == {A: ["n1", "n3"], B: ["n1"]}


def test_binding_holders_prefer_a_live_holder_then_the_owner() -> None:
    snap = snapshot(
        {"n1": State.ALIVE, "n2": State.ALIVE, "n3": State.DEAD},
        {"n1": frozenset({A}), "n2": frozenset({A}), "n3": frozenset({B})},
    )
    decisions = {A: decision("n1"), B: decision("n1"), C: decision(None)}
    out = binding_holders(snap, decisions, {"ba": A, "bb": B, "bc": C, "bd": IPv4Address("10.9.9.9")})
    # Two live holders: the greatest name, whatever the owner says (every node agrees).
    assert out == {"ba": "n2", "bb": "n1", "bc": None, "bd": None}


def test_mmove_peers_only_live_nodes_with_a_cluster_listener() -> None:
    hp = HostPort(IPv4Address("127.0.0.2"), 2525)
    snap = ClusterSnapshot(
        local="n1",
        states={"n1": State.ALIVE, "n2": State.SUSPECT, "n3": State.DEAD, "n4": State.ALIVE},
        views={
            "n1": view("n1", mmove=hp),
            "n2": view("n2", mmove=hp),
            "n3": view("n3", mmove=hp),
            "n4": view("n4"),
        },
    )
    assert mmove_peers(snap) == {"n1": hp, "n2": hp}


def test_reannounce_targets_owned_and_uncontested_only() -> None:
    held = frozenset({A, B, C})
    snap = snapshot(
        {"n1": State.ALIVE, "n2": State.ALIVE, "n3": State.DEAD},
        {"n1": held, "n2": frozenset({B}), "n3": frozenset({C})},
    )
    decisions = {A: decision("n1"), B: decision("n1"), C: decision("n1")}
    # B is contested by a live rival; C's other holder is dead (does not count).
    assert reannounce_targets(snap, decisions, held) == [A, C]
    decisions[A] = decision("n2")
    assert reannounce_targets(snap, decisions, held) == [C]
    assert reannounce_targets(snap, {}, held) == []


def test_handed_off_once_live_peers_hold_what_we_released() -> None:
    released = frozenset({A, B})
    waiting = snapshot({"n1": State.ALIVE, "n2": State.ALIVE}, {"n1": frozenset(), "n2": frozenset({A})})
    assert not handed_off(waiting, released)
    done = snapshot({"n1": State.ALIVE, "n2": State.ALIVE}, {"n1": frozenset(), "n2": frozenset({A, B})})
    assert handed_off(done, released)
    # A dead peer's claim does not count; with no live peer announcing them, nobody to wait for.
    dead = snapshot({"n1": State.ALIVE, "n2": State.DEAD}, {"n1": frozenset(), "n2": frozenset({A, B})})
    assert handed_off(dead, released)
    alone = ClusterSnapshot(local="n1", states={"n1": State.ALIVE}, views={"n1": view("n1")})
    assert handed_off(alone, released) and handed_off(waiting, frozenset())
