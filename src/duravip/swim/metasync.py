"""Member metadata ("views") fetched over TCP when gossip announces a new digest.

Gossip carries only a member's (version, digest, length); the bytes are
fetched by a TCP exchange, first from the owner, then alternately from the
owner and any other live member, with a jittered exponential back-off. A
reply is taken only if it is exactly the announced version and its bytes hash
to the announced digest, whoever sent it.
"""

from __future__ import annotations

from attrs import define

from duravip.swim.codec import MetaRequest, MetaResponse
from duravip.swim.context import Context, meta_digest
from duravip.swim.members import Addr, NodeState, State

#: Meta fetch retries back off from this to ``META_BACKOFF_MAX`` seconds.
META_BACKOFF_MIN = 0.05
META_BACKOFF_MAX = 2.0


@define
class MetaFetch:
    """One member's view being fetched (the announced version and digest)."""

    name: str
    version: int
    digest: int
    attempts: int = 0
    inflight: int | None = None  # stream request id
    retry_at: float | None = None


class MetaSync:
    """Fetches announced views we do not hold yet, and serves the ones we hold."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.fetches: dict[str, MetaFetch] = {}

    def want(self, node: NodeState, now: float) -> None:
        """``node`` announced (version, digest): fetch it unless we hold or fetch it."""
        if node.meta_current:
            return
        f = self.fetches.get(node.name)
        if f is not None and (f.version, f.digest) == (node.meta_version, node.meta_digest):
            return
        if node.meta_len == 0 and node.meta_digest == meta_digest(b""):
            # nothing to fetch: the empty view
            node.meta = b""
            node.have_version, node.have_digest = node.meta_version, node.meta_digest
            self.ctx.touch(node, "meta-changed")
            self.fetches.pop(node.name, None)
            return
        f = MetaFetch(node.name, node.meta_version, node.meta_digest)
        self.fetches[node.name] = f
        self._fetch(f, node.addr)

    def _fetch(self, f: MetaFetch, addr: Addr) -> None:
        f.retry_at = None
        f.inflight = self.ctx.new_stream(
            "meta", addr, MetaRequest(f.name, f.version, f.digest), f.name
        )
        self.ctx.counters["meta_fetches"] += 1

    def done(self, name: str, req_id: int, msg: MetaResponse | None, now: float) -> None:
        """The fetch ``req_id`` of ``name``'s view ended (``msg`` None: it failed)."""
        f = self.fetches.get(name)
        if f is None or f.inflight != req_id:
            return
        f.inflight = None
        ctx = self.ctx
        node = ctx.table.get(name)
        if node is None or node.state in (State.DEAD, State.LEFT):
            self.fetches.pop(name, None)
            return
        if (
            msg is not None
            and msg.found
            and msg.name == name
            and (msg.version, msg.digest) == (node.meta_version, node.meta_digest)
            and meta_digest(msg.meta) == msg.digest
        ):
            node.meta = msg.meta
            node.have_version, node.have_digest = msg.version, msg.digest
            del self.fetches[name]
            ctx.counters["meta_fetched"] += 1
            ctx.touch(node, "meta-changed")
            return
        ctx.counters["meta_fetch_failed"] += 1
        if (f.version, f.digest) != (node.meta_version, node.meta_digest):
            f.version, f.digest, f.attempts = node.meta_version, node.meta_digest, 0
        f.attempts += 1
        backoff = min(META_BACKOFF_MAX, META_BACKOFF_MIN * 2 ** (f.attempts - 1))
        f.retry_at = now + backoff * ctx.rng.uniform(0.5, 1.0)

    def tick(self, now: float) -> None:
        """Retry the fetches whose back-off is over."""
        ctx = self.ctx
        for f in list(self.fetches.values()):
            if f.retry_at is None or now < f.retry_at:
                continue
            node = ctx.table.get(f.name)
            if node is None or node.state in (State.DEAD, State.LEFT) or node.meta_current:
                del self.fetches[f.name]
                continue
            # alternate between the owner and any other live member that may hold the version
            addr = node.addr
            others = [n for n in ctx.table.live_peers() if n != f.name]
            if f.attempts % 2 == 1 and others:
                other = ctx.table.get(ctx.rng.choice(others))
                if other is not None:
                    addr = other.addr
            self._fetch(f, addr)

    def next_deadline(self, d: float) -> float:
        """``d`` or the earliest retry, whichever comes first."""
        for f in self.fetches.values():
            if f.retry_at is not None:
                d = min(d, f.retry_at)
        return d

    def forget(self, name: str) -> None:
        self.fetches.pop(name, None)

    def serve(self, msg: MetaRequest) -> MetaResponse:
        """Our copy of the requested view, if we hold exactly that version."""
        node = self.ctx.table.get(msg.name)
        if node is not None and (
            node is self.ctx.local
            or (node.have_version, node.have_digest) == (msg.version, msg.digest)
        ):
            return MetaResponse(msg.name, True, node.have_version, node.have_digest, node.meta)
        return MetaResponse(msg.name, False, 0, 0, b"")
