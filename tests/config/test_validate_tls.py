"""check-config on STARTTLS keys of Listen blocks: each finding at its file:line:col."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from duravip.config import CheckResult, SourceLoc, check_text

HEADER = """\
cluster { name = "t" node_name = "n1" gossip_address = "10.0.0.1:4801"
  keyring = "/k"
  Topology "10.1.0.0/16" { interface = "eth1" }
}
"""


def _certs() -> ModuleType:
    """``tests/smtp/certs.py`` (the test CA), loaded by path: test dirs are not packages."""
    path = Path(__file__).parent.parent / "smtp" / "certs.py"
    spec = importlib.util.spec_from_file_location("duravip_test_certs", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    issued = _certs().TestCA(tmp_path).issue("server")
    return issued.certificate, issued.key


def run(listen_body: str) -> CheckResult:
    # Line 5, col 18 is the Listen block; its keys follow on line 6.
    return check_text(
        HEADER + 'ESMTP_Listener { Listen "10.0.0.1:25" {\n' + listen_body + "\n} }\n", "v.conf"
    )


def found(result: CheckResult, severity: str, fragment: str) -> SourceLoc | None:
    hits = [d for d in result.diagnostics if d.severity == severity and fragment in d.message]
    assert len(hits) == 1, [str(d) for d in result.diagnostics]
    return hits[0].loc


def test_good_certificate_and_key_are_clean(files: tuple[Path, Path]) -> None:
    cert, key = files
    r = run(f'tls_certificate = "{cert}" tls_key = "{key}" tls = required')
    assert r.ok and r.diagnostics == [], [str(d) for d in r.diagnostics]
    (lst,) = r.config.listeners if r.config else ()
    assert (lst.tls_certificate, lst.tls_key, lst.tls) == (cert, key, "required")


def test_default_is_optional_and_no_certificate_is_fine() -> None:
    r = run("")
    assert r.ok and r.diagnostics == []
    assert r.config is not None and r.config.listeners[0].tls == "optional"


def test_missing_files_point_at_their_keys(tmp_path: Path) -> None:
    r = run(f'tls_certificate = "{tmp_path}/no.crt"\ntls_key = "{tmp_path}/no.key"')
    assert not r.ok
    assert found(r, "error", "tls_certificate") == SourceLoc("v.conf", 6, 1)
    assert found(r, "error", "tls_key") == SourceLoc("v.conf", 7, 1)


def test_key_without_certificate(files: tuple[Path, Path]) -> None:
    r = run(f'tls_key = "{files[1]}"')
    assert found(r, "error", "has tls_key but no tls_certificate") == SourceLoc("v.conf", 6, 1)


def test_required_without_certificate() -> None:
    r = run("tls = required")
    assert found(r, "error", "tls = required but no tls_certificate") == SourceLoc("v.conf", 6, 1)


def test_bad_value_of_tls_is_refused() -> None:
    r = run("tls = maybe")
    assert not r.ok
    assert any("maybe" in d.message for d in r.diagnostics)


def test_key_readable_by_others_is_a_warning(files: tuple[Path, Path]) -> None:
    cert, key = files
    key.chmod(0o644)
    r = run(f'tls_certificate = "{cert}"\ntls_key = "{key}"')
    assert r.ok
    assert found(r, "warning", "readable by every local user") == SourceLoc("v.conf", 7, 1)


def test_a_file_that_is_not_a_certificate_is_an_error(
    files: tuple[Path, Path], tmp_path: Path
) -> None:
    junk = tmp_path / "junk.crt"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    r = run(f'tls_certificate = "{junk}" tls_key = "{files[1]}"')
    assert found(r, "error", "does not load") == SourceLoc("v.conf", 6, 1)


def test_a_key_of_another_certificate_is_an_error(tmp_path: Path) -> None:
    ca = _certs().TestCA(tmp_path)
    a, b = ca.issue("a"), ca.issue("b")
    r = run(f'tls_certificate = "{a.certificate}" tls_key = "{b.key}"')
    assert found(r, "error", "does not load") is not None


def test_session_timeout_must_be_positive() -> None:
    r = check_text(HEADER + "Smtp_Limits { session_timeout = 0 }\n", "v.conf")
    assert found(r, "error", "session_timeout must be positive") == SourceLoc("v.conf", 5, 15)
