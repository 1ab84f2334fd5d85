"""JSON in and out of the server that cannot reach a 500: request bodies holding non-finite numbers (NaN, Infinity,
-Infinity, as Python's json and some JavaScript libraries write them, or a literal such as 1e999 that overflows)
are refused with a 422 naming the field, before any model sees them; and every error answer serialises, whatever
value it quotes (non-finite numbers and objects JSON has no form for are quoted as text)."""

import json
import math

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from sdrt.errors import SdrtError


class NonFiniteNumber(SdrtError):
    """A request body holds a non-finite number at PATH (keys and list indices; named dotted)."""

    def __init__(self, path: tuple, value: str):
        self.path, self.field, self.value = path, ".".join(str(p) for p in path), value
        super().__init__(f"{self.field}: got {value}; allowed: a finite number (JSON has no NaN or Infinity)")


class _NonFinite:
    def __init__(self, text: str):
        self.text = text


def _number(text: str):
    value = float(text)
    return _NonFinite(text) if math.isinf(value) else value


def first_non_finite(body: bytes) -> tuple[tuple, str] | None:
    """(path: keys and list indices, the literal) of the first non-finite number in a JSON BODY, or None (also for
    bodies that are not JSON: FastAPI's own validation answers those)."""
    try:
        data = json.loads(body, parse_constant=_NonFinite, parse_float=_number)
    except (ValueError, RecursionError):
        return None
    stack = [((), data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, _NonFinite):
            return path, value.text
        if isinstance(value, dict):
            stack.extend(((*path, k), v) for k, v in reversed(list(value.items())))
        elif isinstance(value, list):
            stack.extend(((*path, i), v) for i, v in reversed(list(enumerate(value))))
    return None


class FiniteJSONRoute(APIRoute):
    """A route whose JSON body is checked for non-finite numbers before FastAPI parses it into the request model."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def checked(request: Request):
            if request.method in ("POST", "PUT", "PATCH"):
                found = first_non_finite(await request.body())  # the body is kept for the handler
                if found is not None:
                    raise NonFiniteNumber(*found)
            return await handler(request)

        return checked


def printable(value):
    """VALUE with every non-finite float as text and every object JSON cannot hold as its repr."""
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (str, int, bool, type(None))):
        return value
    if isinstance(value, dict):
        return {str(k): printable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [printable(v) for v in value]
    try:
        return printable(jsonable_encoder(value))
    except Exception:  # an object with no JSON form
        return repr(value)[:1000]


def describe(e: BaseException) -> str:
    """ "Type: message" of E, even when its message cannot be made (its __str__ raises)."""
    try:
        return f"{type(e).__name__}: {e}"[:2000]
    except Exception:
        return type(e).__name__


def safe_response(content, status_code: int, headers: dict | None = None) -> JSONResponse:
    """A JSONResponse that serialises whatever CONTENT quotes."""
    return JSONResponse(printable(content), status_code=status_code, headers=headers)


def field_error(field: str, message: str, value, path: tuple | None = None) -> JSONResponse:
    """HTTP 422 in FastAPI's validation-error shape, naming the request field (PATH: its keys, if FIELD's dots
    are not the separators)."""
    text = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
    loc = ["body", *(path if path is not None else field.split("."))]
    detail = [{"loc": loc, "msg": message, "type": "value_error", "input": text}]
    return safe_response({"detail": detail}, 422)


def install(app) -> None:
    """Checked bodies on every route added from now on; 422s for non-finite numbers and validation errors that
    always serialise."""
    app.router.route_class = FiniteJSONRoute

    @app.exception_handler(NonFiniteNumber)
    async def non_finite(_, e: NonFiniteNumber):
        return field_error(e.field, str(e), e.value, e.path)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_, e: RequestValidationError):
        return safe_response({"detail": e.errors()}, 422)
