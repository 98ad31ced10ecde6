"""Views: building from config, the compact encoding, and decode robustness."""

from __future__ import annotations

import zlib
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from duravip.config import ClusterConfig, Config, DuraVip, HostPort
from duravip.election import (
    NodeView,
    Override,
    ViewDecodeError,
    VipClaim,
    build_view,
    decode,
    encode,
)

ip_st = st.integers(0, 2**32 - 1).map(IPv4Address)
name_st = st.text(min_size=0, max_size=12)
claim_st = st.builds(
    VipClaim,
    listener_ports=st.lists(st.integers(0, 65535), max_size=4).map(tuple),
    binding=st.none() | name_st,
    preference=st.none() | name_st,
    follows=st.none() | name_st,
)
view_st = st.builds(
    NodeView,
    node=name_st,
    version=st.integers(0, 2**64 - 1),
    mature=st.booleans(),
    held=st.frozensets(ip_st, max_size=8),
    vips=st.dictionaries(ip_st, claim_st, max_size=12),
    mmove_addr=st.none() | st.builds(HostPort, ip_st, st.integers(0, 65535)),
    overrides=st.dictionaries(ip_st, st.builds(Override, name_st, st.integers(0, 2**64 - 1))),
    config_stable_since=st.floats(allow_nan=False),
    booted_at=st.floats(allow_nan=False),
    status=st.just("") | name_st,
    yields=st.frozensets(ip_st, max_size=8),
    failback_at=st.just(0.0) | st.floats(allow_nan=False),
)


def config(n: int, *, node: str = "n1") -> Config:
    base = int(IPv4Address("10.1.0.0"))
    duravips = {
        IPv4Address(base + i): DuraVip(
            ip=IPv4Address(base + i),
            listener_ports=(25,),
            binding=f"binding-{i}",
            preference=f"n{i % 3 + 1}",
        )
        for i in range(n)
    }
    return Config(
        cluster=ClusterConfig(
            name="c",
            node_name=node,
            gossip_address=HostPort(IPv4Address("192.168.0.1"), 4801),
        ),
        cluster_listener=HostPort(IPv4Address("192.168.0.1"), 4802),
        duravips=duravips,
    )


@given(view_st)
def test_roundtrip(v):
    assert decode(encode(v)) == v


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_view_decode_error(data):
    with pytest.raises(ViewDecodeError):
        decode(data)


@given(view_st, st.data())
def test_damaged_encoding_raises_only_view_decode_error(v, data):
    raw = bytearray(encode(v))
    body = bytearray(zlib.decompress(bytes(raw[4:])))
    if body:
        i = data.draw(st.integers(0, len(body) - 1))
        body[i] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(body)))
    for blob in (
        b"DVV\x01" + zlib.compress(bytes(body)),
        b"DVV\x01" + zlib.compress(bytes(body[:cut])),
        bytes(raw[: len(raw) // 2]),
    ):
        try:
            out = decode(blob)
        except ViewDecodeError:
            continue
        assert isinstance(out, NodeView)


def test_build_view_from_config_and_sharing():
    cfg = config(50)
    v = build_view(cfg, version=3, mature=True, held=[IPv4Address("10.1.0.1")])
    assert v.node == "n1" and v.version == 3 and v.mature
    assert v.mmove_addr == cfg.cluster_listener
    c = v.vips[IPv4Address("10.1.0.7")]
    assert c == VipClaim((25,), "binding-7", "n2", None)
    other = build_view(config(50, node="n2"), version=1, mature=False)
    assert other.vips is v.vips  # equal configs share one mapping
    assert decode(encode(other)).vips is v.vips


def test_decode_refuses_inflation_bomb():
    blob = b"DVV\x01" + zlib.compress(b"\0" * (20 * 1024 * 1024))
    with pytest.raises(ViewDecodeError):
        decode(blob)


def test_10240_duravips_encode_small():
    v = build_view(
        config(10_240), version=1, mature=True, held=list(config(10_240).duravips)[:5000]
    )
    raw = encode(v)
    # unique binding name per IP is the worst realistic case; documented in docs/election.md
    assert len(raw) < 64 * 1024, len(raw)
    assert decode(raw) == v
