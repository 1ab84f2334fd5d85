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
