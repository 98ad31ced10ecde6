"""Whatever the text, loading fails only with ConfigError (never another exception)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from duravip.config import ConfigError, check_text, loads

TOKENS = [
    "cluster",
    "Topology",
    "ESMTP_Listener",
    "Listen",
    "Binding",
    "Binding_Group",
    "Metrics",
    "Control_Listener",
    "ECCluster_Listener",
    "Spool",
    "Delivery",
    "Smtp_Limits",
    "name",
    "gossip_address",
    "peers",
    "profile",
    "Enable_Duravip",
    "Duravip_Follow",
    "Bind_Address",
    "Duravip_Preference",
    "interface",
    "cidrmask",
    "mode",
    "path",
    "use_iflist_cache",
    "=",
    "{",
    "}",
    "(",
    ")",
    '"',
    "#",
    "\n",
    " ",
    "\\",
    ";",
    '"10.1.1.1:25"',
    "10.1.1.1",
    '"10.1.0.0/16"',
    "true",
    "0600",
    "2s",
    "fast",
    "x",
    '"a\\"b"',
    "-1",
    "99999",
]


def _loads_or_config_error(text: str) -> None:
    try:
        loads(text, "fuzz")
    except ConfigError as exc:
        assert exc.errors, "a ConfigError always carries at least one error"
        for d in exc.diagnostics:
            str(d)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text(text: str) -> None:
    _loads_or_config_error(text)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=60).map(" ".join))
def test_token_soup(text: str) -> None:
    _loads_or_config_error(text)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=30).map(" ".join))
def test_token_soup_inside_a_valid_cluster(extra: str) -> None:
    text = (
        "cluster { name = x gossip_address = 10.0.0.1:1 keyring = /k\n"
        '  Topology "10.1.0.0/16" { interface = eth1 } }\n' + extra
    )
    _loads_or_config_error(text)
    r = check_text(text)
    assert (r.config is None) == bool(r.errors)
