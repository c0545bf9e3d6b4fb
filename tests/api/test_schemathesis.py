"""Property-based requests generated from our own OpenAPI schema: never a 500.

Runs schemathesis' strategies with Hypothesis directly, per operation, against the app
(real Postgres and Redis behind it), authenticated as a user with credits.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error


def test_no_server_errors(app, make_account):
    account = make_account(credits=100_000)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    statuses: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)  # fmt: skip
        def check(case):
            response = case.call_and_validate(headers=account.headers, checks=[not_a_server_error])
            statuses.append(response.status_code)

        check()
    # It really exercised the API: many requests, and both successes and refusals.
    assert len(statuses) > 100
    assert any(s < 300 for s in statuses) and any(400 <= s < 500 for s in statuses)
