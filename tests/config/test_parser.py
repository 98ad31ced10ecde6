"""The stanza parser: every syntax form, the reference's examples, error positions."""

from __future__ import annotations

import pytest

from duravip.config import ConfigError, SourceLoc
from duravip.config.parser import Assign, ListValue, Scalar, Stanza, parse


def only(text: str) -> Assign | Stanza:
    items = parse(text, "f").items
    assert len(items) == 1
    return items[0]


def test_assignment_quoted_and_bare() -> None:
    a, b = parse('key = "v a l"\nBind_Address = 192.168.0.51\n', "f").items
    assert isinstance(a, Assign) and isinstance(b, Assign)
    assert a.key == "key" and a.value == Scalar("v a l", True, SourceLoc("f", 1, 7))
    assert b.key == "Bind_Address" and b.value == Scalar(
        "192.168.0.51", False, SourceLoc("f", 2, 16)
    )
    assert a.loc == SourceLoc("f", 1, 1) and b.loc == SourceLoc("f", 2, 1)


@pytest.mark.parametrize("bare", ["10.1.0.11:4801", "/etc/x", "0600", "a-b_c.d", "10.1.1.0/24"])
def test_bare_values(bare: str) -> None:
    node = only(f"k = {bare}")
    assert isinstance(node, Assign) and node.value == Scalar(bare, False, SourceLoc("f", 1, 5))


def test_block_forms() -> None:
    a, b, c, d = parse('A { }\nB "x y" { k = 1 }\nC arg {}\nD "only"\n', "f").items
    assert isinstance(a, Stanza) and a.arg is None and a.body == ()
    assert isinstance(b, Stanza) and b.arg == Scalar("x y", True, SourceLoc("f", 2, 3))
    assert b.body is not None and isinstance(b.body[0], Assign) and b.body[0].key == "k"
    assert isinstance(c, Stanza) and c.arg == Scalar("arg", False, SourceLoc("f", 3, 3))
    assert isinstance(d, Stanza) and d.body is None and d.arg is not None and d.arg.text == "only"


def test_stanza_without_block_inside_block() -> None:
    node = only('Metrics { Listen "10.1.0.11:9100" }')
    assert isinstance(node, Stanza) and node.body is not None
    (listen,) = node.body
    assert isinstance(listen, Stanza) and listen.body is None and listen.loc.col == 11


def test_lists() -> None:
    node = only('peers = ( "10.1.0.12:4801" 10.1.0.13:4801 )')
    assert isinstance(node, Assign) and isinstance(node.value, ListValue)
    assert [i.text for i in node.value.items] == ["10.1.0.12:4801", "10.1.0.13:4801"]
    assert node.value.loc == SourceLoc("f", 1, 9)
    empty = only("peers = ()")
    assert isinstance(empty, Assign) and empty.value == ListValue((), SourceLoc("f", 1, 9))


def test_comments_semicolons_and_newlines_carry_no_meaning() -> None:
    text = '# top\nA { # open\n  k = "#not a comment" ; j = 2 # tail\n}\n'
    node = only(text)
    assert isinstance(node, Stanza) and node.body is not None
    k, j = node.body
    assert (
        isinstance(k, Assign) and isinstance(k.value, Scalar) and k.value.text == "#not a comment"
    )
    assert isinstance(j, Assign) and j.loc == SourceLoc("f", 3, 26)


def test_escapes() -> None:
    node = only(r'k = "a\"b\\c\nd\te"')
    assert isinstance(node, Assign) and isinstance(node.value, Scalar)
    assert node.value.text == 'a"b\\c\nd\te'


def test_keys_keep_spelling_for_messages() -> None:
    node = only("Enable_DuraVIP = TRUE")
    assert isinstance(node, Assign) and node.key == "Enable_DuraVIP"


def test_one_line_nesting_and_tabs() -> None:
    node = only('cluster {\tTopology "10.1.1.0/24" { cidrmask = 32 interface = "eth1" } }')
    assert isinstance(node, Stanza) and node.body is not None
    (topo,) = node.body
    assert isinstance(topo, Stanza) and topo.loc == SourceLoc("f", 1, 11)
    assert topo.body is not None and len(topo.body) == 2


# Every configuration example of the reference text (its "..." elisions dropped).
REFERENCE_EXAMPLES = [
    """cluster {
  # DuraVIP network topology hints
  Topology "10.1.1.0/24" {
    cidrmask = "32"
    interface = "eth1"
  }
}""",
    """ESMTP_Listener {
  Listen "10.1.1.1:25" {
    Enable_Duravip = true
  }
  Listen "10.1.1.2:25" {
    Enable_Duravip = true
  }

}
Binding "duravip-1" {
  Enable_Duravip = true
  Bind_Address = "10.1.1.1"
}
Binding "duravip-2" {
  Enable_Duravip = true
  Bind_Address = "10.1.1.2"
}""",
    """ESMTP_Listener {
  Listen "10.1.1.1:25" {
    Enable_Duravip = true
    Duravip_Preference = "nodename"
  }
}
Binding "foo" {
  Enable_Duravip = true
  Bind_Address = "10.1.1.1"
  Duravip_Preference = "nodename"
}""",
    """ESMTP_Listener {
  Listen "10.1.1.1:25" {
    Duravip_Follow = "bindingname"
  }
}
Binding "bindingname" {
  Enable_Duravip = true
  Bind_Address = "10.2.1.1"
}""",
    """listen "10.110.83.140:25" {
  duravip_follow = "example"
}
binding "example" {
  bind_address = "10.110.83.140"
}""",
    """# node1 configuration
ESMTP_Listener {
  Listen "192.168.0.51:25" {
    Enable_Duravip = "true"
  }
}
Binding example {
  Enable_Duravip = "true"
  Bind_Address = 192.168.0.51
}

# node2 configuration
Binding example {
  Enable_Duravip = "true"
  Bind_Address = 192.168.0.51
}""",
]


@pytest.mark.parametrize("text", REFERENCE_EXAMPLES)
def test_reference_examples_parse(text: str) -> None:
    doc = parse(text, "ref")
    assert doc.items
    assert all(isinstance(i, Stanza) and i.body for i in doc.items)


def test_reference_bare_binding_name_and_address() -> None:
    doc = parse(REFERENCE_EXAMPLES[-1], "ref")
    b = doc.items[1]
    assert isinstance(b, Stanza) and b.arg == Scalar("example", False, SourceLoc("ref", 7, 9))
    assert b.body is not None
    addr = b.body[1]
    assert isinstance(addr, Assign) and addr.value == Scalar(
        "192.168.0.51", False, SourceLoc("ref", 9, 18)
    )


def test_lab_config_parses(lab_n1: str) -> None:
    assert len(parse(lab_n1).items) == 12


@pytest.mark.parametrize(
    ("text", "line", "col", "fragment"),
    [
        ('k = "abc\n', 1, 5, "unterminated string"),
        ("A {\n  k = 1\n", 3, 1, "expected '}'"),
        ("A { }\n}\n", 2, 1, "expected a key or stanza name"),
        ("k = \n}", 2, 1, "expected a value after 'k ='"),
        ("k = = 1", 1, 5, "expected a value"),
        ("A {\n  k\n}", 3, 1, "expected '=', '{' or an argument after 'k'"),
        ('"x" = 1', 1, 1, "expected a key or stanza name"),
        ("k = ( a { )", 1, 9, "expected a list item or ')'"),
        ('k = "a\\qb"', 1, 7, "unknown escape"),
        ("= 1", 1, 1, "expected a key or stanza name"),
        ("k = ( a b", 1, 10, "expected a list item or ')'"),
    ],
)
def test_errors_have_position_and_expectation(
    text: str, line: int, col: int, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text, "f.conf")
    (diag,) = info.value.diagnostics
    assert diag.severity == "error"
    assert diag.loc == SourceLoc("f.conf", line, col), str(diag)
    assert fragment in diag.message
    assert str(diag).startswith(f"f.conf:{line}:{col}: error: ")


def test_unexpected_control_character() -> None:
    with pytest.raises(ConfigError) as info:
        parse("k = a\x00b", "f")
    assert info.value.diagnostics[0].loc == SourceLoc("f", 1, 6)


def test_nesting_limit_is_an_error_not_a_crash() -> None:
    with pytest.raises(ConfigError, match="nested"):
        parse("a { " * 200 + "} " * 200)
