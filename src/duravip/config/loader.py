"""The one entry point: text or file -> validated :class:`Config`, or every problem."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import attrs
from attrs import frozen

from duravip.config.convert import UNSTRUCTURE
from duravip.config.diagnostics import ConfigError, Diagnostic
from duravip.config.model import Config
from duravip.config.parser import Document, parse, parse_file
from duravip.config.structure import structure
from duravip.config.validate import validate

log = logging.getLogger("duravip.config")


@frozen
class CheckResult:
    """Outcome of :func:`check`: the config when usable, and every finding."""

    config: Config | None
    diagnostics: list[Diagnostic] = attrs.field(factory=list)

    @property
    def ok(self) -> bool:
        return self.config is not None and not self.errors

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.is_error]

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "warning"]


def _check_doc(doc: Document, node_name: str | None) -> CheckResult:
    config, locs, diags = structure(doc, node_name)
    if config is not None:
        diags = diags + validate(config, locs)
    diags.sort(key=lambda d: (d.loc.file, d.loc.line, d.loc.col) if d.loc else ("", 0, 0))
    if any(d.is_error for d in diags):
        return CheckResult(None, diags)
    return CheckResult(config, diags)


def check_text(text: str, source: str = "<string>", node_name: str | None = None) -> CheckResult:
    """Parse, structure and validate ``text``; never raises for a bad config."""
    try:
        doc = parse(text, source)
    except ConfigError as exc:
        return CheckResult(None, exc.diagnostics)
    return _check_doc(doc, node_name)


def check(path: str | Path, node_name: str | None = None) -> CheckResult:
    """Like :func:`check_text` for a file (``duravip check-config`` uses it)."""
    try:
        doc = parse_file(path)
    except ConfigError as exc:
        return CheckResult(None, exc.diagnostics)
    return _check_doc(doc, node_name)


def _unwrap(result: CheckResult) -> Config:
    if result.config is None:
        raise ConfigError(result.diagnostics)
    for d in result.diagnostics:
        log.log(logging.WARNING if d.severity == "warning" else logging.INFO, "%s", d)
    return result.config


def loads(text: str, source: str = "<string>", node_name: str | None = None) -> Config:
    """Config from text; raises :class:`ConfigError` listing every error (and warning)."""
    return _unwrap(check_text(text, source, node_name))


def load(path: str | Path, node_name: str | None = None) -> Config:
    """Config from a file; warnings and infos are logged to ``duravip.config``."""
    return _unwrap(check(path, node_name))


def to_jsonable(config: Config) -> dict[str, Any]:
    """Plain JSON types for ``--json``: IPs, networks, endpoints and paths as strings."""
    out: dict[str, Any] = UNSTRUCTURE.unstructure(config)
    return out
