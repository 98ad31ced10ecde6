"""Plain-text tables and durations for console replies.

Kept tiny and dependency-free so every handler renders the same way and the
output stays readable in a terminal and greppable in a log.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return ",".join(_cell(v) for v in items) or "-"
    return str(value).replace("\n", " ")


def _numeric(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Render an aligned table: a header, a rule, one line per row, no trailing spaces.

    A column whose values are all numbers (or ``None``) is right-aligned, the
    rest left-aligned; ``None`` shows as ``-`` and collections as comma lists.
    An empty table still shows its header, so scripts can rely on the shape.
    """
    rows = [list(r) for r in rows]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, expected {len(headers)}: {row}")
    align = [
        bool(rows) and all(_numeric(r[i]) or r[i] is None for r in rows)
        for i in range(len(headers))
    ]
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for crow in cells:
        for i, c in enumerate(crow):
            widths[i] = max(widths[i], len(c))

    def fmt(row: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, align, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [fmt(list(headers)), "  ".join("-" * w for w in widths)]
    out.extend(fmt(c) for c in cells)
    return "\n".join(out)


def format_duration(seconds: float | None) -> str:
    """Short human duration: ``250ms``, ``1.5s``, ``12s``, ``5m03s``, ``2h05m``, ``3d04h``."""
    if seconds is None or math.isnan(seconds):
        return "-"
    if math.isinf(seconds):
        return "forever" if seconds > 0 else "-forever"
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if round(seconds * 1000) < 1000:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{int(seconds)}s"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
