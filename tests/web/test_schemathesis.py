"""schemathesis against the OpenAPI document a real server serves (uvicorn over TCP on a real store, with a running
engine): no 5xx, no response off the schema, and every mutating call refuses a missing or wrong token."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.web.live import Live, live_stack
from tests.web.served import TOKENS

EXAMPLES = 15
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]
"""Not schemathesis's positive-data check: a schema-valid cursor that this API never handed out is rightly a 422."""
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    with live_stack(f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}", tmp_path) as server:
        yield server


def operations(live: Live) -> list[schemathesis.APIOperation]:
    schema = schemathesis.openapi.from_url(f"{live.url}/api/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def test_generated_calls_get_no_5xx_and_answers_that_fit_the_schema(live: Live) -> None:
    """Calls generated from the served document, with a valid token, get no 5xx and every answer (problem+json
    included) fits the document."""
    headers = {"Authorization": f"Bearer {TOKENS['alice']}"}
    found = operations(live)
    assert len(found) >= 15
    for operation in found:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(headers=headers, checks=CHECKS)

        check()


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token-000000000000", "Basic YWxpY2U6eA=="])
def test_every_mutating_call_refuses_a_missing_or_wrong_token(live: Live, authorization: str | None) -> None:
    """Every mutating operation of the document, called without a token or with a wrong one, is refused with 401."""
    headers = {"Authorization": authorization} if authorization else {}
    mutating = [op for op in operations(live) if op.method.upper() in MUTATING]
    assert len(mutating) >= 7
    for operation in mutating:
        @given(case=operation.as_strategy())
        @settings(max_examples=3, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case: schemathesis.Case) -> None:
            if case.path_parameters:  # a path naming nothing is a 404 before any token is read
                case.path_parameters = dict.fromkeys(case.path_parameters, "0190f0e2-0000-7000-8000-000000000001")
            response = case.call(headers=headers)
            assert response.status_code == 401, (case.path, response.status_code, response.text[:200])

        check()
