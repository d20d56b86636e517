"""Property-based fuzzing of the API from its own OpenAPI document (schemathesis), with keys required and a valid
key sent, on SQLite and PostgreSQL (issue 19): no response is a 5xx, and every response is one the document
describes (status, content type, headers, body schema). The example count is bounded so both databases take well
under a minute."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.db import ApiKey
from service.security import hash_key
from service.settings import Settings
from tests.unit.test_job_states import scratch_database

BOTH = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
EXAMPLES = 15
KEY = "ht_" + secrets.token_urlsafe(32)
CHECKS = [schemathesis.checks.not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]


@pytest.mark.parametrize("kind", BOTH)
def test_no_5xx_and_every_response_as_documented(kind: str, tmp_path: Path) -> None:
    with scratch_database(kind, tmp_path) as url:
        app = create_app(Settings(home=tmp_path / "home", database_url=url, auth="required", bind_host="127.0.0.1"),
                         send=lambda *a: None, run_reconciler=False)
        with app.state.sessions.begin() as session:
            session.add(ApiKey(name="fuzz", prefix=KEY[:8], key_hash=hash_key(KEY)))
        try:
            api = schemathesis.openapi.from_asgi("/openapi.json", app)
            for operation in api.get_all_operations():
                fuzz(operation.ok())
        finally:
            app.state.sessions.kw["bind"].dispose()


def fuzz(operation: object) -> None:
    """Up to EXAMPLES generated requests on one operation, each response checked."""

    @given(case=operation.as_strategy())  # type: ignore[attr-defined]
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=CHECKS)

    run()
