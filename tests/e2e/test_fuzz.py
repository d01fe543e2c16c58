"""A short schemathesis run against the service's own /openapi.json: no 5xx, no hang, every error in OpenAI's shape.

The long form: `make fuzz` (more examples per operation)."""

from __future__ import annotations

import collections
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

pytestmark = pytest.mark.e2e
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))


def test_no_server_errors_and_openai_shaped_errors(tiny_server):
    schema = schemathesis.openapi.from_url(tiny_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/completions",
        "POST /v1/chat/completions",
        "POST /v1/inspect",
        "POST /tokenize",
        "POST /detokenize",
    }
    statuses: collections.Counter[int] = collections.Counter()
    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def check(case):
            response = case.call(timeout=30)
            statuses[response.status_code // 100 * 100] += 1
            assert response.status_code < 500, (case.operation.path, case.body, response.text[:500])
            if response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}, response.text[:500]

        check()
    assert statuses[200] > 0 and statuses[400] > 0, statuses  # it generated both valid and invalid requests
