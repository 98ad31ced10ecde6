"""Reading the raw stanza tree: typed values, block shapes, diagnostics, source positions.

The generic half of structuring, shared by every section: how one raw value
becomes its field's type (through the cattrs hooks of
:mod:`~duravip.config.convert`), how a block's keys and sub-blocks are read
and checked by name, and how each problem becomes a :class:`Diagnostic`
instead of an exception. :mod:`~duravip.config.structure` knows the sections.
"""

from __future__ import annotations

import difflib
import functools
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Final, Literal, Union

import attrs

from duravip.config.convert import STRUCTURE, parse_mode
from duravip.config.diagnostics import Diagnostic
from duravip.config.model import SourceLoc
from duravip.config.parser import Assign, ListValue, Node, Scalar, Stanza

__all__ = ["DISPLAY", "MISSING", "Locs", "StanzaReader", "field_types", "shape", "suggest"]

#: Source positions by path, e.g. ``("cluster", "gossip_address")`` or
#: ``("listener", 3, "duravip_follow")`` (index into ``Config.listeners``).
Locs = dict[tuple[object, ...], SourceLoc]

#: A value that could not be converted (its error is already recorded).
MISSING: Final = object()

#: Per-key converters that differ from the field's type default.
SPECIAL: Final[dict[str, Callable[[str], Any]]] = {"mode": parse_mode}

#: Canonical spellings of keys, used in "did you mean" hints and messages.
DISPLAY: Final = {
    "enable_duravip": "Enable_Duravip",
    "duravip_follow": "Duravip_Follow",
    "duravip_preference": "Duravip_Preference",
    "bind_address": "Bind_Address",
}


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type for an attrs class (model uses string annotations)."""
    attrs.resolve_types(cls)
    return {f.name: f.type for f in attrs.fields(cls) if f.name != "loc"}


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


@functools.cache
def shape(tp: Any) -> tuple[str, Any, Any]:
    """How to convert a field type: ("tuple", item type, None), ("literal",
    choices, None) or ("scalar", type, cattrs hook). Cached: configs hold
    tens of thousands of values of a handful of types."""
    tp = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if origin is tuple:
        return ("tuple", typing.get_args(tp)[0], None)
    if origin is Literal:
        return ("literal", typing.get_args(tp), None)
    return ("scalar", tp, STRUCTURE.get_structure_hook(tp))


def suggest(word: str, candidates: Iterable[str]) -> str | None:
    cands = list(candidates)
    by_low = {c.lower(): c for c in cands}
    match = difflib.get_close_matches(word.lower(), list(by_low), n=1, cutoff=0.6)
    if match:
        return f"did you mean '{by_low[match[0]]}'?"
    if cands:
        return "expected one of: " + ", ".join(sorted(cands, key=str.lower))
    return None


class StanzaReader:
    """Reads blocks of one document, collecting diagnostics and source positions."""

    def __init__(self) -> None:
        self.diags: list[Diagnostic] = []
        self.locs: Locs = {}

    # -- diagnostics -------------------------------------------------------
    def error(self, loc: SourceLoc | None, message: str, hint: str | None = None) -> None:
        self.diags.append(Diagnostic("error", loc, message, hint))

    # -- generic helpers ---------------------------------------------------
    def convert(self, value: Scalar | ListValue, tp: Any, key: str) -> Any:
        """Convert one raw value to ``tp``; on failure record an error, return MISSING."""
        kind, arg, hook = shape(tp)
        if kind == "tuple":
            items = value.items if isinstance(value, ListValue) else (value,)
            out = [self.convert(item, arg, key) for item in items]
            return MISSING if any(o is MISSING for o in out) else tuple(out)
        if isinstance(value, ListValue):
            self.error(value.loc, f"'{key}' takes a single value, not a list")
            return MISSING
        text = value.text
        try:
            if key in SPECIAL:
                return SPECIAL[key](text)
            if kind == "literal":
                low = text.lower()
                if low in arg:
                    return low
                self.error(
                    value.loc,
                    f"invalid value {text!r} for '{key}'",
                    suggest(text, [str(c) for c in arg]),
                )
                return MISSING
            return hook(text, arg)
        except ValueError as exc:
            self.error(value.loc, f"invalid value for '{key}': {exc}")
            return MISSING

    def section(
        self,
        stanza: Stanza | None,
        keys: dict[str, Any],
        subs: Iterable[str] = (),
        path: tuple[object, ...] = (),
    ) -> tuple[dict[str, Any], list[Stanza]]:
        """Read a block: typed values of its keys, and its sub-stanzas (checked by name)."""
        values: dict[str, Any] = {}
        stanzas: list[Stanza] = []
        if stanza is None or stanza.body is None:
            return values, stanzas
        return self.items(stanza.body, keys, subs, path, stanza.name)

    def items(
        self,
        body: Iterable[Node],
        keys: dict[str, Any],
        subs: Iterable[str],
        path: tuple[object, ...],
        where: str,
    ) -> tuple[dict[str, Any], list[Stanza]]:
        sub_low = {s.lower(): s for s in subs}
        values: dict[str, Any] = {}
        seen: dict[str, SourceLoc] = {}
        stanzas: list[Stanza] = []
        for node in body:
            low = (node.key if isinstance(node, Assign) else node.name).lower()
            if isinstance(node, Assign):
                if low not in keys:
                    hint = suggest(low, [DISPLAY.get(k, k) for k in keys])
                    if low in sub_low:
                        hint = f"'{sub_low[low]}' is a block: write {sub_low[low]} ... {{ }}"
                    self.error(node.loc, f"unknown key '{node.key}' in {where}", hint)
                    continue
                if low in seen:
                    first = seen[low]
                    self.error(
                        node.loc,
                        f"duplicate key '{node.key}' in {where}",
                        f"first set at line {first.line} col {first.col}",
                    )
                    continue
                seen[low] = node.loc
                self.locs[(*path, low)] = node.loc
                v = self.convert(node.value, keys[low], DISPLAY.get(low, low))
                if v is not MISSING:
                    values[low] = v
            else:
                if low not in sub_low:
                    hint = suggest(node.name, list(sub_low.values()))
                    if low in keys:
                        hint = f"'{node.name}' is a key: write {node.name} = value"
                    self.error(node.loc, f"unknown block '{node.name}' in {where}", hint)
                    continue
                stanzas.append(node)
        return values, stanzas

    def want_block(self, st: Stanza, arg: bool) -> bool:
        """Check the stanza's shape: an argument if ``arg``, never without a block unless allowed."""
        if arg and st.arg is None:
            self.error(st.loc, f"'{st.name}' needs an argument", f'write {st.name} "..." {{ }}')
            return False
        if not arg and st.arg is not None:
            self.error(st.arg.loc, f"'{st.name}' takes no argument", f"write {st.name} {{ }}")
            return False
        return True

    def single(self, stanzas: list[Stanza], name: str) -> Stanza | None:
        for extra in stanzas[1:]:
            first = stanzas[0].loc
            self.error(
                extra.loc,
                f"'{name}' given twice",
                f"first at line {first.line} col {first.col}; merge them",
            )
        return stanzas[0] if stanzas else None

    def arg_value(self, st: Stanza, tp: Any, what: str) -> Any:
        assert st.arg is not None
        return self.convert(st.arg, tp, what)
