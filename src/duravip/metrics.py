"""Counters, gauges and histograms rendered in the Prometheus text format (0.0.4).

Owned rather than imported from ``prometheus_client``: what the daemon needs
is a few hundred lines, and owning it keeps the dependency list short and the
rendering under our tests. Single-threaded by design: every update happens on
the daemon's Trio thread, so there are no locks.

The registry and rendering are sans-IO; :func:`serve_http` is the thin Trio
driver that exposes ``GET /metrics``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import ClassVar, Generic, NoReturn, TypeVar

import trio

log = logging.getLogger(__name__)

#: Histogram buckets for fail-over durations in seconds (``+Inf`` is implicit).
FAILOVER_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def format_value(v: float) -> str:
    """A sample value as Prometheus parses it (``+Inf``, ``NaN``, Python float repr)."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def escape_label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _label_str(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{escape_label_value(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + inner + "}"


# --- children: one time series (or one histogram) for one label combination ---


class CounterChild:
    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        self.value += amount


class GaugeChild:
    def __init__(self) -> None:
        self._value = 0.0
        self._fn: Callable[[], float] | None = None

    def set(self, value: float) -> None:
        self._fn = None
        self._value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        self._value += amount

    def dec(self, amount: float = 1.0) -> None:
        self._value -= amount

    def set_function(self, fn: Callable[[], float]) -> None:
        """Read the value from ``fn`` at render time (e.g. ``len(held_ips)``)."""
        self._fn = fn

    @property
    def value(self) -> float:
        return float(self._fn()) if self._fn is not None else self._value


class HistogramChild:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1
                break

    def cumulative(self) -> list[tuple[float, int]]:
        """``(le, count)`` pairs including ``+Inf``, as exposed."""
        out: list[tuple[float, int]] = []
        total = 0
        for upper, n in zip(self.buckets, self.counts, strict=True):
            total += n
            out.append((upper, total))
        out.append((math.inf, self.count))
        return out


C = TypeVar("C", CounterChild, GaugeChild, HistogramChild)


class _Family(Generic[C]):
    """A metric name with its label names and one child per label-value tuple."""

    type_name: ClassVar[str]

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for ln in labelnames:
            if not _LABEL_NAME.match(ln) or ln.startswith("__"):
                raise ValueError(f"invalid label name {ln!r}")
        if len(set(labelnames)) != len(labelnames):
            raise ValueError(f"duplicate label names in {labelnames!r}")
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], C] = {}
        if not self.labelnames:
            self._children[()] = self._new_child()

    def _new_child(self) -> C:
        raise NotImplementedError

    def labels(self, *values: str, **kw: str) -> C:
        """The child for these label values (positional, or by name: not both)."""
        if values and kw:
            raise ValueError("pass label values positionally or by name, not both")
        if kw:
            if set(kw) != set(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {sorted(kw)}")
            values = tuple(kw[n] for n in self.labelnames)
        if not self.labelnames:
            raise ValueError(f"{self.name} has no labels")
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._new_child()
        return child

    def remove(self, *values: str) -> None:
        """Drop one label combination (e.g. a node that left the cluster)."""
        self._children.pop(tuple(str(v) for v in values), None)

    def _only(self) -> C:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames}; use .labels(...)")
        return self._children[()]

    def children(self) -> Iterator[tuple[tuple[str, ...], C]]:
        yield from sorted(self._children.items())

    def samples(self) -> Iterator[tuple[str, tuple[str, ...], tuple[str, ...], float]]:
        """``(name, labelnames, labelvalues, value)`` for every exposed sample."""
        raise NotImplementedError

    def render(self) -> str:
        lines = [f"# HELP {self.name} {escape_help(self.help)}", f"# TYPE {self.name} {self.type_name}"]
        for name, lnames, lvalues, value in self.samples():
            lines.append(f"{name}{_label_str(lnames, lvalues)} {format_value(value)}")
        return "\n".join(lines) + "\n"


class Counter(_Family[CounterChild]):
    type_name = "counter"

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def inc(self, amount: float = 1.0) -> None:
        self._only().inc(amount)

    @property
    def value(self) -> float:
        return self._only().value

    def samples(self) -> Iterator[tuple[str, tuple[str, ...], tuple[str, ...], float]]:
        for key, child in self.children():
            yield self.name, self.labelnames, key, child.value


class Gauge(_Family[GaugeChild]):
    type_name = "gauge"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (),
                 callback: Callable[[], float] | None = None) -> None:
        super().__init__(name, help, labelnames)
        self._collector: Callable[[], Mapping[tuple[str, ...], float]] | None = None
        if callback is not None:
            self.set_function(callback)

    def _new_child(self) -> GaugeChild:
        return GaugeChild()

    def set(self, value: float) -> None:
        self._only().set(value)

    def inc(self, amount: float = 1.0) -> None:
        self._only().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._only().dec(amount)

    def set_function(self, fn: Callable[[], float]) -> None:
        self._only().set_function(fn)

    def set_collector(self, fn: Callable[[], Mapping[tuple[str, ...], float]]) -> None:
        """For a labelled gauge: read every series from ``fn`` at render time.

        E.g. members by state: ``lambda: {("alive",): 3, ("dead",): 1}``. Series
        set with ``labels(...).set`` are still exposed unless ``fn`` names them too.
        """
        if not self.labelnames:
            raise ValueError(f"{self.name} has no labels; use set_function")
        self._collector = fn

    @property
    def value(self) -> float:
        return self._only().value

    def samples(self) -> Iterator[tuple[str, tuple[str, ...], tuple[str, ...], float]]:
        values = {key: child.value for key, child in self._children.items()}
        if self._collector is not None:
            for key, v in self._collector().items():
                if len(key) != len(self.labelnames):
                    raise ValueError(f"{self.name}: collector gave {key}, labels {self.labelnames}")
                values[tuple(str(k) for k in key)] = float(v)
        for key in sorted(values):
            yield self.name, self.labelnames, key, values[key]


class Histogram(_Family[HistogramChild]):
    type_name = "histogram"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (),
                 buckets: Sequence[float] = FAILOVER_BUCKETS) -> None:
        if "le" in labelnames:
            raise ValueError("'le' is reserved for histogram buckets")
        b = tuple(float(x) for x in buckets if not math.isinf(x))
        if not b or list(b) != sorted(set(b)):
            raise ValueError(f"buckets must be increasing and non-empty: {buckets}")
        self.buckets = b
        super().__init__(name, help, labelnames)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.buckets)

    def observe(self, value: float) -> None:
        self._only().observe(value)

    def samples(self) -> Iterator[tuple[str, tuple[str, ...], tuple[str, ...], float]]:
        bucket_names = (*self.labelnames, "le")
        for key, child in self.children():
            for upper, n in child.cumulative():
                yield f"{self.name}_bucket", bucket_names, (*key, format_value(upper)), n
            yield f"{self.name}_sum", self.labelnames, key, child.sum
            yield f"{self.name}_count", self.labelnames, key, child.count


Metric = Counter | Gauge | Histogram


class Registry:
    """The daemon's metrics, exposed in registration order."""

    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}

    def register(self, metric: Metric) -> None:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name!r} is already registered")
        self._metrics[metric.name] = metric

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        m = Counter(name, help, labelnames)
        self.register(m)
        return m

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = (),
              callback: Callable[[], float] | None = None) -> Gauge:
        m = Gauge(name, help, labelnames, callback)
        self.register(m)
        return m

    def histogram(self, name: str, help: str, labelnames: Sequence[str] = (),
                  buckets: Sequence[float] = FAILOVER_BUCKETS) -> Histogram:
        m = Histogram(name, help, labelnames, buckets)
        self.register(m)
        return m

    def get(self, name: str) -> Metric | None:
        return self._metrics.get(name)

    def render(self) -> str:
        """The whole registry in Prometheus text exposition format 0.0.4.

        A gauge callback that raises is logged and that metric skipped, so one
        bad probe does not blank the whole scrape.
        """
        parts: list[str] = []
        for m in self._metrics.values():
            try:
                parts.append(m.render())
            except Exception:  # a faulty callback must not break every scrape
                log.exception("metric %s failed to render", m.name)
        return "".join(parts)


# --- HTTP exposition (sans-IO request handling, then the Trio driver) ---

#: Largest request head we read; anything longer is answered 431 and closed.
MAX_REQUEST_HEAD = 8192
#: Seconds a client has to send its request head.
READ_TIMEOUT = 5.0
MAX_HTTP_CLIENTS = 16


def _http(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8",
          head_only: bool = False) -> bytes:
    head = (
        f"HTTP/1.0 {status}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head if head_only else head + body


def http_response(head: bytes, registry: Registry) -> bytes:
    """The full response for one request head (request line plus headers)."""
    try:
        request_line = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0].decode("ascii")
        method, target, _version = request_line.split(" ")
    except (UnicodeDecodeError, ValueError):
        return _http("400 Bad Request", b"bad request\n")
    path = target.split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return _http("405 Method Not Allowed", b"only GET\n")
    if path != "/metrics":
        return _http("404 Not Found", b"not found; try /metrics\n", head_only=method == "HEAD")
    body = registry.render().encode()
    return _http("200 OK", body, CONTENT_TYPE, head_only=method == "HEAD")


async def _read_head(stream: trio.abc.Stream) -> bytes | None:
    """The request head, or None if it is too long (the caller answers 431)."""
    buf = bytearray()
    while b"\r\n\r\n" not in buf and b"\n\n" not in buf:
        if len(buf) > MAX_REQUEST_HEAD:
            return None
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


async def _serve_http_client(stream: trio.SocketStream, registry: Registry) -> None:
    async with stream:
        with trio.move_on_after(READ_TIMEOUT) as scope:
            head = await _read_head(stream)
        if scope.cancelled_caught:
            return
        if head is None:
            response = _http("431 Request Header Fields Too Large", b"request too large\n")
        elif not head:
            return
        else:
            response = http_response(head, registry)
        with trio.move_on_after(READ_TIMEOUT):
            await stream.send_all(response)
            await _linger(stream)


async def _linger(stream: trio.SocketStream) -> None:
    """Half-close, then read what the client still sends (bounded).

    Closing with unread request bytes makes the kernel send RST, which can
    destroy the response before the client reads it (e.g. after a 431).
    """
    await stream.send_eof()
    drained = 0
    with trio.move_on_after(1.0):
        while drained < 1 << 20 and (chunk := await stream.receive_some(65536)):
            drained += len(chunk)


async def serve_http(
    *,
    registry: Registry,
    host: str,
    port: int,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Answer ``GET /metrics`` on ``host:port`` until cancelled; ``started`` gets the port.

    Port 0 picks a free port (tests). HTTP/1.0, one request per connection.
    """
    limiter = trio.CapacityLimiter(MAX_HTTP_CLIENTS)

    async def handler(stream: trio.SocketStream) -> None:
        async with limiter:
            try:
                await _serve_http_client(stream, registry)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.debug("metrics client went away")

    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    log.info("metrics on http://%s:%d/metrics", host, bound)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(bound)
        await trio.sleep_forever()
    raise AssertionError("unreachable")
