"""Schemathesis over a running server's OpenAPI schema: each operation gets schema-valid and schema-invalid
requests (bounded count, no shrinking); no answer may be a 5xx the schema does not declare, none may hang."""

import time
from collections import Counter

import requests

CASE_TIMEOUT_S = 30.0  # one request; longer counts as a hang


def fuzz(url: str, auth=None, examples: int = 12, prepare=None, budget_s: float = 120.0) -> Counter:
    """Fuzz every operation of URL's /openapi.json with EXAMPLES positive and EXAMPLES negative cases each
    (within BUDGET_S in all); PREPARE(case) may bound a case (e.g. its steps). Returns {status: count}; raises
    AssertionError naming the case on an undeclared 5xx or a hang."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    spec = requests.get(url + "/openapi.json", auth=auth, timeout=CASE_TIMEOUT_S).json()
    schema = schemathesis.openapi.from_url(url + "/openapi.json", auth=auth)
    statuses: Counter = Counter()
    deadline = time.monotonic() + budget_s
    session = requests.Session()
    session.auth = auth
    for result in schema.get_all_operations():
        operation = result.ok()
        declared = set(spec["paths"][operation.path][operation.method.lower()].get("responses", {}))
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=examples, deadline=None, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck), database=None, derandomize=True)  # fmt: skip
            def run(case):
                if time.monotonic() > deadline:
                    return
                if prepare is not None:
                    prepare(case)
                try:
                    response = case.call(base_url=url, session=session, timeout=CASE_TIMEOUT_S)
                except requests.Timeout:
                    raise AssertionError(f"hang: {case.method} {case.formatted_path} {case.body!r:.300}") from None
                statuses[response.status_code] += 1
                if response.status_code >= 500 and str(response.status_code) not in declared:  # noqa: B023 (run now)
                    raise AssertionError(
                        f"undeclared {response.status_code} for {case.method} {case.formatted_path} "
                        f"{case.body!r:.300}: {response.text[:300]}"
                    )

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (an operation without parameters or body)
                pass
    return statuses


# Values no schema-driven generator sends: literals JSON has no number for (Python's json and some JavaScript
# libraries write them), numbers past float range, and oversized values.
NON_FINITE = ("NaN", "Infinity", "-Infinity", "1e999", "-1e999")
OVERSIZED = ("1" + "0" * 40, "1e308", "-1e308", '"' + "x" * 20000 + '"', "[" + ",".join(["0"] * 10000) + "]",
             "[" * 200 + "]" * 200, "{" + ",".join(f'"k{i}": {i}' for i in range(5000)) + "}")  # fmt: skip
PLACEHOLDER = "\u2063bad\u2063"


def value_paths(body, path=()) -> list[tuple]:
    """Every place in a JSON BODY a value sits: dict keys and list indices, outermost first."""
    found = []
    items = body.items() if isinstance(body, dict) else enumerate(body) if isinstance(body, list) else ()
    for key, value in items:
        found.append((*path, key))
        found.extend(value_paths(value, (*path, key)))
    return found


def with_literal(body, path: tuple, literal: str) -> str:
    """BODY as JSON text with the value at PATH replaced by LITERAL (any JSON-ish text, NaN included)."""
    import copy
    import json

    body = copy.deepcopy(body)
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = PLACEHOLDER
    return json.dumps(body).replace(json.dumps(PLACEHOLDER), literal, 1)


def fuzz_values(url: str, auth=None, examples: int = 12, prepare=None, budget_s: float = 120.0) -> Counter:
    """Schema-valid bodies of every JSON-body operation with one value (anywhere, nested ones included) replaced by
    a non-finite number or an oversized value. Non-finite ones must be a 422 naming the field; none may be a 5xx.
    Returns {status: count}."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(url + "/openapi.json", auth=auth)
    statuses: Counter = Counter()
    deadline = time.monotonic() + budget_s
    session = requests.Session()
    session.auth = auth
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.method.upper() != "POST" or not operation.body:
            continue

        @given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE), data=st.data())
        @settings(max_examples=examples, deadline=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck), database=None, derandomize=True)  # fmt: skip
        def run(case, data):
            if time.monotonic() > deadline or not isinstance(case.body, dict) or not case.body:
                return
            if prepare is not None:
                prepare(case)
            path = data.draw(st.sampled_from(value_paths(case.body)))
            literal = data.draw(st.sampled_from(NON_FINITE + OVERSIZED))
            text = with_literal(case.body, path, literal)
            try:
                response = session.post(url + case.formatted_path, data=text, timeout=CASE_TIMEOUT_S,
                                        headers={"content-type": "application/json"})  # fmt: skip
            except requests.Timeout:
                raise AssertionError(f"hang: {case.formatted_path} {text[:300]}") from None
            statuses[response.status_code] += 1
            where = f"{case.formatted_path} with {'.'.join(map(str, path))} = {literal[:40]}"
            assert response.status_code < 500, f"{response.status_code} for {where}: {response.text[:300]}"
            if literal in NON_FINITE:
                assert response.status_code == 422, f"{response.status_code} for {where}"
                assert response.json()["detail"][0]["loc"] == ["body", *path], where

        run()
    return statuses
