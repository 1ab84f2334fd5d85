"""parse_prompt_attention against A1111's documented outputs (exact floats) and its algorithm's edge cases."""

import math
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdrt.runtime.errors import InvalidOption
from sdrt.runtime.prompt import parse_prompt_attention

# A1111 modules/prompt_parser.py, parse_prompt_attention's docstring, verbatim (its lists as tuples). The
# floats are compared with ==: A1111's order of multiplications gives 1.5730000000000004, not 1.573.
A1111_DOCSTRING = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]

# Derived from A1111's algorithm; every expected value below is what A1111 v1.10 returned for the input.
EDGE_CASES = [
    ("", [("", 1.0)]),
    ("(", [("", 1.0)]),  # nothing inside: no piece at all
    ("(\\", [("", 1.1)]),  # a lone backslash is an empty piece, which the open "(" then weights
    ("((x))", [("x", 1.2100000000000002)]),
    ("[x]", [("x", 0.9090909090909091)]),  # times the constant 1/1.1
    ("[[x]]", [("x", 0.8264462809917354)]),
    ("([a", [("a", 1.0)]),  # unclosed: rounds first, then squares (x1.1, then x(1/1.1))
    ("(a:1.2:3)", [("a:1.2", 3.0)]),  # only the last ":w)" is a weight
    ("(x:-1)", [("x", -1.0)]),
    ("(x:.5)", [("x", 0.5)]),
    ("(x:+2.)", [("x", 2.0)]),
    ("(x: 1.5 )", [("x", 1.5)]),
    ("(x:1e3)", [("x:1e3", 1.1)]),  # no exponent in weights: text, then a plain ")"
    ("(x:١.٥)", [("x", 1.5)]),  # Unicode digits, as Python's \d and float() read them
    ("a:1.2)", [("a:1.2)", 1.0)]),  # a weight with no "(" open is text
    ("]a)", [("]a)", 1.0)]),
    (r"\\(", [("\\", 1.0)]),  # an escaped backslash, then an unclosed "(" with nothing in it
    (r"\]\\\x", [("]\\x", 1.0)]),
    ("a\\b", [("ab", 1.0)]),  # a backslash before another character is dropped
    ("a (b", [("a ", 1.0), ("b", 1.1)]),
    ("[a (b] c)", [("a ", 0.9090909090909091), ("b", 1.0), (" c", 1.1)]),  # ( and [ counted apart
    (
        "((a) b [c (d:2)] e:0.5) f",
        [("a", 0.55), (" b ", 0.5), ("c ", 0.45454545454545453), ("d", 0.9090909090909091), (" e", 0.5), (" f", 1.0)],
    ),
    ("(a:0)(b:-0)", [("ab", 0.0)]),  # -0.0 == 0.0 merges
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("x BREAK BREAK y", [("x", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("y", 1.0)]),
    ("a \xa0BREAK\u3000\n b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),  # Unicode whitespace is eaten
    ("a,BREAK,b", [("a,", 1.0), ("BREAK", -1.0), (",b", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),  # not a whole word
    ("a BREAKb", [("a BREAKb", 1.0)]),
    ("BREAK_ x", [("BREAK_ x", 1.0)]),
    ("éBREAK", [("éBREAK", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # A1111 weights BREAK too: no break there
]


@pytest.mark.parametrize(("text", "expected"), A1111_DOCSTRING + EDGE_CASES)
def test_matches_a1111(text, expected):
    got = parse_prompt_attention(text)
    assert got == expected
    assert all(type(piece) is str and type(weight) is float for piece, weight in got)


def test_a1111_order_of_products_is_what_is_checked():
    """Powers would miss: 1.1 ** 4 and 1.1 ** 7000 differ in the last bits from A1111's running products."""
    assert 1.1**4 != 1.4641000000000006  # the docstring's "sky"
    running = 1.0
    for _ in range(7000):
        running *= 1.1
    assert 1.1**7000 != running


def test_malformed_weight_is_text():
    """A1111 raises ValueError on float('1.2.3'); here the ':' and what follows are text, as for (x:1e3)."""
    assert parse_prompt_attention("(a:1.2.3)") == [("a:1.2.3", 1.1)]
    assert parse_prompt_attention("(a:.)") == [("a:.", 1.1)]


def test_deep_nesting_keeps_a1111_value_while_finite():
    """7000 nested "(": A1111's product 1.1 x ... x 1.1 (in order) is finite and returned bit for bit."""
    expected = 1.0
    for _ in range(7000):
        expected *= 1.1
    assert math.isfinite(expected)
    assert parse_prompt_attention("(" * 7000 + "x") == [("x", expected)]


@pytest.mark.parametrize(
    ("text", "weight"),
    [
        ("(" * 8000 + "x", sys.float_info.max),  # A1111: inf
        ("(x:" + "9" * 400 + ")", sys.float_info.max),  # float() gives inf
        ("(x:-" + "9" * 400 + ")", -sys.float_info.max),
        ("((x:0):" + "9" * 400 + ")", 0.0),  # A1111: 0 x inf = nan
    ],
)
def test_weights_saturate_instead_of_overflowing(text, weight):
    assert parse_prompt_attention(text) == [("x", weight)]


def test_underflow_is_a1111s():
    """10000 nested "[": A1111's running product sticks at a subnormal, finite, and is returned as is."""
    expected = 1.0
    for _ in range(10000):
        expected *= 1 / 1.1
    assert parse_prompt_attention("[" * 10000 + "x") == [("x", expected)]


@pytest.mark.parametrize(
    "text",
    [
        "(a" * 5000,
        "(" * 10000,
        "(" * 5000 + ")" * 5000,
        "[" * 5000 + ":",
        "[a(" * 3000 + "]b)" * 300,
        " " * 10000 + "x",
        "BREAK " * 1700,
        ":" + "1" * 9999,
        "\\" * 10000,
        "(a:" * 3000 + ")" * 3000,
    ],
)
def test_pathological_inputs_complete(text):
    got = parse_prompt_attention(text)
    assert got and all(math.isfinite(weight) for _, weight in got)


@pytest.mark.parametrize("value", [None, 3, b"(a)", ["(a)"]])
def test_non_string_is_rejected(value):
    with pytest.raises(InvalidOption) as err:
        parse_prompt_attention(value)
    assert (err.value.field, err.value.value, err.value.allowed) == ("prompt", value, "a string")


prompt_text = st.text(alphabet=st.sampled_from(list("ab :|()[]\\.1-e\n\t")) | st.characters(), max_size=300)


@settings(max_examples=300, deadline=None)
@given(prompt_text)
def test_any_text_parses_to_finite_weights(text):
    got = parse_prompt_attention(text)
    assert got and all(type(p) is str and type(w) is float and math.isfinite(w) for p, w in got)
    assert all(got[k][1] != got[k + 1][1] for k in range(len(got) - 1))  # runs of equal weight are merged


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300).filter(lambda t: "BREAK" not in t))
def test_escaped_text_comes_back_unweighted(text):
    """Every (, ), [, ], \\ escaped: the text comes back as written, with weight 1."""
    escaped = "".join("\\" + c if c in "()[]\\" else c for c in text)
    assert parse_prompt_attention(escaped) == [(text, 1.0)]
