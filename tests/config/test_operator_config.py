"""Health checks, preemption and notify keys: structured, defaulted, validated with file:line:col."""

from __future__ import annotations

from pathlib import Path

from duravip.config import CheckResult, SourceLoc, check_text
from duravip.config.model import HealthCheck

HEADER = """\
cluster { name = "t" node_name = "n1" gossip_address = "10.0.0.1:4801"
  keyring = "/k"
  Topology "10.1.0.0/16" { interface = "eth1" }
}
"""


def run(body: str, cluster: str = "") -> CheckResult:
    text = HEADER.replace('  keyring = "/k"\n', f'  keyring = "/k"\n{cluster}') if cluster else HEADER
    return check_text(text + body, "v.conf")


def only(result: CheckResult, severity: str, fragment: str) -> SourceLoc | None:
    found = [d for d in result.diagnostics if d.severity == severity and fragment in d.message]
    assert len(found) == 1, [str(d) for d in result.diagnostics]
    return found[0].loc


def loc(line: int, col: int) -> SourceLoc:
    return SourceLoc("v.conf", line, col)


def test_defaults_without_any_operator_keys() -> None:
    r = run("")
    assert r.ok and r.config is not None
    c = r.config.cluster
    assert (c.preempt, c.preempt_delay, c.notify, c.notify_fifo, c.notify_timeout) == (
        True, 0.0, None, None, 5.0,
    )  # fmt: skip
    assert r.config.health == ()


def test_every_check_kind_and_the_cluster_keys(tmp_path: Path) -> None:
    script = tmp_path / "check"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    r = run(
        'Health_Check "smtp" { rise = 3 fall = 2 interval = 500ms timeout = 200ms }\n'
        'Health_Check "disk" { type = spool min_free = 1000000 }\n'
        'Health_Check "link" { }\n'
        f'Health_Check "mine" {{ type = script path = "{script}" flap_limit = 4 hold_down = 2m }}\n'
        'Binding "b" { Enable_Duravip = true Bind_Address = "10.1.1.1" preempt = false preempt_delay = 3s }\n',
        cluster='  preempt = no preempt_delay = 10s notify = "/bin/true" notify_timeout = 2\n',
    )
    assert r.ok, [str(d) for d in r.diagnostics]
    assert r.config is not None
    h = {c.name: c for c in r.config.health}
    assert h["smtp"] == HealthCheck("smtp", "smtp", rise=3, fall=2, interval=0.5, timeout=0.2)
    assert h["disk"].kind == "spool" and h["disk"].min_free == 1_000_000
    assert h["link"].kind == "link" and (h["link"].rise, h["link"].fall) == (2, 3)
    assert h["mine"].path == script and h["mine"].hold_down == 120.0 and h["mine"].flap_limit == 4
    c = r.config.cluster
    assert (c.preempt, c.preempt_delay, c.notify, c.notify_timeout) == (False, 10.0, Path("/bin/true"), 2.0)
    b = r.config.binding("b")
    assert b is not None and (b.preempt, b.preempt_delay) == (False, 3.0)


def test_a_check_whose_name_is_no_kind_needs_a_type() -> None:
    r = run('Health_Check "disk" { min_free = 1 }\n')
    assert not r.ok and only(r, "error", "needs a type") == loc(5, 1)


def test_a_bad_type_and_an_unknown_key_point_at_themselves() -> None:
    r = run('Health_Check "x" { type = ping }\nHealth_Check "smtp" { rize = 2 }\n')
    assert not r.ok
    assert only(r, "error", "invalid value 'ping'") == loc(5, 27)
    assert only(r, "error", "unknown key 'rize'") == loc(6, 23)


def test_script_checks_need_an_executable_path() -> None:
    r = run('Health_Check "s" { type = script }\n')
    assert not r.ok and only(r, "error", "needs a path") == loc(5, 1)
    r = run('Health_Check "s" { type = script path = "/nonexistent/check" }\n')
    assert r.ok and only(r, "warning", "not an executable") == loc(5, 34)


def test_bad_counts_and_times() -> None:
    r = run('Health_Check "smtp" {\n  rise = 0\n  fall = 0\n  interval = 0\n  timeout = 2\n}\n')
    assert not r.ok
    assert only(r, "error", "rise must be at least 1") == loc(6, 3)
    assert only(r, "error", "fall must be at least 1") == loc(7, 3)
    assert only(r, "error", "interval must be positive") == loc(8, 3)
    assert only(r, "warning", "longer than interval") == loc(9, 3)


def test_duplicate_check_names() -> None:
    r = run('Health_Check "smtp" { }\nHealth_Check "SMTP" { type = smtp }\n')
    assert not r.ok and only(r, "error", "given twice") == loc(6, 1)


def test_link_without_topology_and_notify_warnings(tmp_path: Path) -> None:
    line2 = f'  notify = "/nonexistent/hook" notify_fifo = "{tmp_path}" notify_timeout = 0 }}'
    r = check_text(
        'cluster { name = t node_name = n1 gossip_address = "10.0.0.1:4801" keyring = /k\n'
        f"{line2}\n"
        'Health_Check "link" { }\n',
        "v.conf",
    )
    assert only(r, "warning", "watches nothing") == loc(3, 1)
    assert only(r, "warning", "is not executable") == loc(2, 3)
    assert only(r, "warning", "is not a FIFO") == loc(2, line2.index("notify_fifo") + 1)
    assert only(r, "error", "notify_timeout must be positive") == loc(2, line2.index("notify_timeout") + 1)
