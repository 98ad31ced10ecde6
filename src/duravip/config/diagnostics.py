"""Diagnostics: every problem found in a config, with where and what to do.

The parser, the structurer and the validator all report through
:class:`Diagnostic` so ``check-config`` can print every problem at once in the
familiar ``file:line:col: severity: message`` form.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from attrs import frozen

from duravip.config.model import SourceLoc

Severity = Literal["error", "warning", "info"]


@frozen
class Diagnostic:
    """One finding; ``loc`` is None only when no source position applies."""

    severity: Severity
    loc: SourceLoc | None
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        where = f"{self.loc}: " if self.loc is not None else ""
        tail = f" (hint: {self.hint})" if self.hint else ""
        return f"{where}{self.severity}: {self.message}{tail}"

    @property
    def is_error(self) -> bool:
        return self.severity == "error"


class ConfigError(Exception):
    """A config that cannot be used; ``diagnostics`` lists every finding.

    ``errors`` are the fatal ones; warnings and infos found on the way are
    kept too so a caller can print everything in one go.
    """

    def __init__(self, diagnostics: Iterable[Diagnostic]) -> None:
        self.diagnostics: list[Diagnostic] = list(diagnostics)
        errors = self.errors
        first = str(errors[0]) if errors else "invalid configuration"
        more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
        super().__init__(first + more)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.is_error]

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "warning"]
