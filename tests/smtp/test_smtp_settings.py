"""The SMTP core's own settings: converted from the config once, never imported from it."""

from __future__ import annotations

import subprocess
import sys

import attrs

from duravip.config import SmtpLimits
from duravip.smtp.settings import ServerSettings, SessionLimits, session_limits

#: The sans-IO SMTP modules: none may pull in the config package or trio.
SANS_IO = (
    "duravip.smtp.server",
    "duravip.smtp.settings",
    "duravip.smtp.events",
    "duravip.smtp.parsing",
    "duravip.smtp.replies",
    "duravip.smtp.body",
    "duravip.smtp.newlines",
    "duravip.smtp.types",
)


def test_sans_io_smtp_modules_import_neither_config_nor_trio() -> None:
    code = (
        "import sys\n"
        f"for m in {SANS_IO!r}: __import__(m)\n"
        "bad = sorted(m for m in sys.modules if m == 'trio' or m.startswith('trio.')"
        " or m == 'duravip.config' or m.startswith('duravip.config.'))\n"
        "print(' '.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split() == []


def test_defaults_equal_the_configs() -> None:
    assert session_limits(SmtpLimits()) == SessionLimits()
    assert ServerSettings(hostname="h").limits == SessionLimits()


def test_every_field_is_copied_from_the_config() -> None:
    names = [f.name for f in attrs.fields(SessionLimits)]
    assert set(names) <= {f.name for f in attrs.fields(SmtpLimits)}
    source = SmtpLimits(
        max_message_size=1234,
        max_recipients=7,
        max_line_length=80,
        max_errors=3,
        command_timeout=1.5,
        data_timeout=2.5,
        bare_newline="normalize",
        max_sessions=9,
    )
    got = session_limits(source)
    assert type(got) is SessionLimits
    assert {n: getattr(got, n) for n in names} == {n: getattr(source, n) for n in names}


def test_server_settings_convert_on_construction_and_evolve() -> None:
    s = ServerSettings(hostname="h", limits=SmtpLimits(max_errors=3))
    assert type(s.limits) is SessionLimits
    assert s.limits.max_errors == 3
    own = SessionLimits(max_recipients=2)
    assert ServerSettings(hostname="h", limits=own).limits is own  # no copy of its own type
    evolved = attrs.evolve(s, limits=SmtpLimits(bare_newline="normalize"))
    assert type(evolved.limits) is SessionLimits
    assert evolved.limits.bare_newline == "normalize"


def test_extra_mail_params_are_upper_cased() -> None:
    s = ServerSettings(hostname="h", extra_mail_params=["xBinding", "XMMOVEID"])
    assert s.extra_mail_params == frozenset({"XBINDING", "XMMOVEID"})
