"""server/safe_json.py: where a request body's non-finite number is, and error answers that always serialise."""

import json
import math

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")

from sdrt.server.safe_json import describe, first_non_finite, printable, safe_response  # noqa: E402


@pytest.mark.parametrize(
    "body, found",
    [
        ('{"cfg_scale": NaN}', (("cfg_scale",), "NaN")),
        ('{"a": 1, "b": {"c": [1, 2, -Infinity]}}', (("b", "c", 2), "-Infinity")),
        ('{"seed": 1e999}', (("seed",), "1e999")),
        ('[0, {"": Infinity}]', ((1, ""), "Infinity")),
        ('{"a.b": NaN}', (("a.b",), "NaN")),
        ('{"x": 1e308, "y": -1.5, "z": 12345678901234567890123}', None),  # finite, however large
        ('{"prompt": "NaN Infinity"}', None),  # words in a string are text
        ("not json", None),  # FastAPI answers those itself
        ("[" * 100000 + "]" * 100000, None),
    ],
)
def test_first_non_finite_names_the_path(body, found):
    assert first_non_finite(body.encode()) == found


def test_error_answers_always_serialise():
    class Odd:
        def __str__(self):
            raise RuntimeError("no text")

    content = {"detail": [{"input": math.nan, "x": (math.inf, -math.inf), "o": object(), "k": {1: Odd()}}]}
    body = json.loads(safe_response(content, 422).body)
    assert body["detail"][0]["input"] == "nan" and body["detail"][0]["x"] == ["inf", "-inf"]
    assert printable(1.5) == 1.5 and printable("x") == "x"
    e = RuntimeError("boom")
    assert describe(e) == "RuntimeError: boom"

    class Unprintable(Exception):
        def __str__(self):
            raise ValueError

    assert describe(Unprintable()) == "Unprintable"


def test_the_plain_encoder_fails_where_safe_response_does_not():
    """can-fail twin: FastAPI's JSONResponse on the same content raises (the 500 this module prevents)."""
    from fastapi.responses import JSONResponse

    with pytest.raises(ValueError, match="Out of range float"):
        JSONResponse({"input": math.nan})
