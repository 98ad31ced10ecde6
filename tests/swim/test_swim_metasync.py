"""swim.metasync on its own: fetch, verify, back off, alternate sources, serve."""

from __future__ import annotations

from duravip.swim import codec
from duravip.swim.codec import MetaRequest, MetaResponse
from duravip.swim.context import meta_digest
from duravip.swim.members import Addr, NodeState, State
from duravip.swim.metasync import META_BACKOFF_MIN, MetaSync

from .contexts import KEY, addr, new_context

VIEW = b"view of a" * 10



def make(*peers: str) -> MetaSync:
    ctx = new_context(*peers, meta=b"mine")
    ctx.events.clear()
    return MetaSync(ctx)


def announce(ms: MetaSync, name: str, meta: bytes, version: int = 1) -> NodeState:
    node = ms.ctx.table.get(name)
    assert node is not None
    node.meta_version, node.meta_digest, node.meta_len = version, meta_digest(meta), len(meta)
    return node


def requests(ms: MetaSync) -> list[tuple[int, Addr, MetaRequest]]:
    out = []
    for r in ms.ctx.streams:
        msg = codec.decode_stream(KEY.open(r.data, "c", b"tcp").plaintext)
        assert r.kind == "meta" and isinstance(msg, MetaRequest)
        out.append((r.id, r.addr, msg))
    ms.ctx.streams.clear()
    return out


def test_an_announced_view_is_fetched_once_and_taken_if_it_matches() -> None:
    ms = make("a")
    node = announce(ms, "a", VIEW)
    ms.want(node, 1.0)
    ms.want(node, 1.0)  # already being fetched
    [(rid, to, req)] = requests(ms)
    assert to == addr(1) and req == MetaRequest("a", 1, meta_digest(VIEW))
    ms.done("a", rid, MetaResponse("a", True, 1, meta_digest(VIEW), VIEW), 1.1)
    assert node.meta == VIEW and node.meta_current
    assert [e.kind for e in ms.ctx.events] == ["meta-changed"]
    assert ms.fetches == {} and ms.ctx.counters["meta_fetched"] == 1


def test_the_empty_view_needs_no_fetch() -> None:
    ms = make("a")
    node = announce(ms, "a", b"", version=3)
    ms.want(node, 1.0)
    assert requests(ms) == [] and node.meta_current and node.meta == b""


def test_bytes_that_do_not_hash_to_the_digest_are_refused_and_retried_elsewhere() -> None:
    ms = make("a", "b")
    node = announce(ms, "a", VIEW)
    ms.want(node, 1.0)
    [(rid, _, _)] = requests(ms)
    forged = MetaResponse("a", True, 1, meta_digest(VIEW), b"forged")
    ms.done("a", rid, forged, 1.0)
    assert node.meta == b"" and ms.ctx.counters["meta_fetch_failed"] == 1
    retry = ms.fetches["a"].retry_at
    assert retry is not None and 1.0 + META_BACKOFF_MIN / 2 <= retry <= 1.0 + META_BACKOFF_MIN
    assert ms.next_deadline(99.0) == retry
    ms.tick(retry - 1e-6)
    assert requests(ms) == []
    ms.tick(retry)
    [(rid2, to, _)] = requests(ms)
    assert to == addr(2)  # after an odd number of failures: another member that may hold it
    ms.done("a", rid, None, retry)  # a late answer to the old request: ignored
    assert ms.fetches["a"].inflight == rid2


def test_a_dead_members_fetch_is_dropped() -> None:
    ms = make("a")
    node = announce(ms, "a", VIEW)
    ms.want(node, 1.0)
    [(rid, _, _)] = requests(ms)
    node.state = State.DEAD
    ms.done("a", rid, None, 1.1)
    assert ms.fetches == {}


def test_serve_gives_only_the_exact_version_held() -> None:
    ms = make("a")
    mine = ms.serve(MetaRequest("x", 7, 7))  # our own view: always the current one
    assert mine.found and mine.meta == b"mine" and mine.digest == meta_digest(b"mine")
    node = announce(ms, "a", VIEW)
    node.meta, node.have_version, node.have_digest = VIEW, 1, meta_digest(VIEW)
    assert ms.serve(MetaRequest("a", 1, meta_digest(VIEW))).meta == VIEW
    assert not ms.serve(MetaRequest("a", 2, meta_digest(VIEW))).found
    assert not ms.serve(MetaRequest("nobody", 1, 1)).found
