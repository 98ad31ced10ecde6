"""Metrics registry rendering (exact text) and the HTTP endpoint on a real socket."""

from __future__ import annotations

import math

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from duravip.metrics import (
    FAILOVER_BUCKETS,
    MAX_REQUEST_HEAD,
    Histogram,
    Registry,
    http_response,
    serve_http,
)


def test_render_exact_text() -> None:
    reg = Registry()
    moves = reg.counter("duravip_moves_total", "IP moves by reason.", ["reason"])
    moves.labels(reason="failure").inc()
    moves.labels("failure").inc(2)
    moves.labels(reason="admin").inc()
    held = reg.gauge("duravip_ips_held", "IPs plumbed here.")
    held.set(3)
    members = reg.gauge("duravip_members", "Members by state.", ["state"])
    members.set_collector(lambda: {("alive",): 2, ("dead",): 1})
    fo = reg.histogram("duravip_failover_seconds", "Failure to plumb.", buckets=[0.1, 1])
    fo.observe(0.05)
    fo.observe(0.5)
    fo.observe(7)
    assert reg.render() == (
        "# HELP duravip_moves_total IP moves by reason.\n"
        "# TYPE duravip_moves_total counter\n"
        'duravip_moves_total{reason="admin"} 1.0\n'
        'duravip_moves_total{reason="failure"} 3.0\n'
        "# HELP duravip_ips_held IPs plumbed here.\n"
        "# TYPE duravip_ips_held gauge\n"
        "duravip_ips_held 3.0\n"
        "# HELP duravip_members Members by state.\n"
        "# TYPE duravip_members gauge\n"
        'duravip_members{state="alive"} 2.0\n'
        'duravip_members{state="dead"} 1.0\n'
        "# HELP duravip_failover_seconds Failure to plumb.\n"
        "# TYPE duravip_failover_seconds histogram\n"
        'duravip_failover_seconds_bucket{le="0.1"} 1.0\n'
        'duravip_failover_seconds_bucket{le="1.0"} 2.0\n'
        'duravip_failover_seconds_bucket{le="+Inf"} 3.0\n'
        "duravip_failover_seconds_sum 7.55\n"
        "duravip_failover_seconds_count 3.0\n"
    )


def test_escaping() -> None:
    reg = Registry()
    c = reg.counter("dropped_total", 'Back\\slash and\nnewline "quoted".', ["reason"])
    c.labels(reason='a"b\\c\nd').inc()
    text = reg.render()
    assert '# HELP dropped_total Back\\\\slash and\\nnewline "quoted".\n' in text
    assert 'dropped_total{reason="a\\"b\\\\c\\nd"} 1.0\n' in text
    assert text.count("\n") == 3  # nothing raw leaked a line break


def test_gauge_function_and_failing_callback_is_isolated() -> None:
    reg = Registry()
    items = [1, 2]
    reg.gauge("queue", "Queued.", callback=lambda: len(items))
    items.append(3)

    def boom() -> float:
        raise RuntimeError("probe failed")

    reg.gauge("bad", "Broken probe.", callback=boom)
    reg.counter("after", "Still rendered.").inc()
    text = reg.render()
    assert "queue 3.0\n" in text
    assert "bad" not in text
    assert "after 1.0\n" in text


def test_validation() -> None:
    reg = Registry()
    c = reg.counter("c_total", "x", ["a", "b"])
    with pytest.raises(ValueError, match="already registered"):
        reg.counter("c_total", "x")
    with pytest.raises(ValueError, match="invalid metric name"):
        reg.counter("1bad", "x")
    with pytest.raises(ValueError, match="invalid label name"):
        reg.counter("ok", "x", ["__reserved"])
    with pytest.raises(ValueError, match="reserved"):
        reg.histogram("h", "x", ["le"])
    with pytest.raises(ValueError, match="increasing"):
        reg.histogram("h2", "x", buckets=[1, 0.5])
    with pytest.raises(ValueError, match="labels"):
        c.inc()  # labelled family needs .labels()
    with pytest.raises(ValueError):
        c.labels(a="1")  # missing b
    with pytest.raises(ValueError, match="only goes up"):
        c.labels("1", "2").inc(-1)
    with pytest.raises(ValueError, match="no labels"):
        reg.gauge("g", "x").labels("v")


def test_label_removal() -> None:
    reg = Registry()
    g = reg.gauge("member_up", "x", ["node"])
    g.labels(node="n1").set(1)
    g.labels(node="n2").set(1)
    g.remove("n1")
    assert 'node="n1"' not in reg.render() and 'member_up{node="n2"} 1.0' in reg.render()


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=50))
def test_histogram_buckets_cumulative(values: list[float]) -> None:
    h = Histogram("h", "x")
    for v in values:
        h.observe(v)
    pairs = h._only().cumulative()
    assert [le for le, _ in pairs] == [*FAILOVER_BUCKETS, math.inf]
    counts = [n for _, n in pairs]
    assert counts == sorted(counts)  # cumulative: never decreasing
    for le, n in pairs:
        assert n == sum(1 for v in values if v <= le)
    assert counts[-1] == len(values) == h._only().count
    assert h._only().sum == pytest.approx(sum(values))


def test_failover_buckets_cover_the_spec_range() -> None:
    assert FAILOVER_BUCKETS[0] == 0.05 and FAILOVER_BUCKETS[-1] == 30


def test_http_response_routing() -> None:
    reg = Registry()
    reg.counter("x_total", "x").inc()
    ok = http_response(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n", reg)
    head, body = ok.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.0 200 OK\r\n")
    assert b"Content-Type: text/plain; version=0.0.4" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert body == reg.render().encode()
    assert http_response(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", reg).startswith(b"HTTP/1.0 200")
    assert http_response(b"GET / HTTP/1.0\r\n\r\n", reg).startswith(b"HTTP/1.0 404")
    assert http_response(b"POST /metrics HTTP/1.0\r\n\r\n", reg).startswith(b"HTTP/1.0 405")
    assert http_response(b"garbage\r\n\r\n", reg).startswith(b"HTTP/1.0 400")
    head_only = http_response(b"HEAD /metrics HTTP/1.0\r\n\r\n", reg)
    assert head_only.endswith(b"\r\n\r\n") and b"200 OK" in head_only


async def _fetch(port: int, raw: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(raw)
        out = b""
        while chunk := await stream.receive_some(65536):
            out += chunk
    return out


async def test_http_endpoint_real_socket() -> None:
    """Loopback of the test process: no interfaces or namespaces are touched."""
    reg = Registry()
    c = reg.counter("duravip_packets_dropped_total", "Dropped.", ["reason"])
    c.labels(reason="decrypt").inc(4)
    with trio.fail_after(15):
        async with trio.open_nursery() as n:
            port = await n.start(lambda task_status: serve_http(
                registry=reg, host="127.0.0.1", port=0, task_status=task_status))
            got = await _fetch(port, b"GET /metrics HTTP/1.0\r\n\r\n")
            assert got.startswith(b"HTTP/1.0 200 OK")
            assert b'duravip_packets_dropped_total{reason="decrypt"} 4.0\n' in got
            assert (await _fetch(port, b"GET /nope HTTP/1.0\r\n\r\n")).startswith(
                b"HTTP/1.0 404")
            huge = await _fetch(port, b"GET /metrics HTTP/1.0\r\nX: " + b"a" * (MAX_REQUEST_HEAD * 2))
            assert huge.startswith(b"HTTP/1.0 431")
            n.cancel_scope.cancel()


async def test_http_read_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that never sends its request is dropped after the read timeout."""
    monkeypatch.setattr("duravip.metrics.READ_TIMEOUT", 0.3)
    reg = Registry()
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            port = await n.start(lambda task_status: serve_http(
                registry=reg, host="127.0.0.1", port=0, task_status=task_status))
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                start = trio.current_time()
                assert await stream.receive_some(100) == b""  # server closed on us
                assert 0.2 < trio.current_time() - start < 5
            n.cancel_scope.cancel()
