"""A schema-driven fuzz (schemathesis) of every route in the server's OpenAPI, the native API and A1111's alike:
bodies and parameters drawn from the schemas, and invalid ones beside them. Zero 5xx, and every answer conforms
to the documented status codes, content types and response schemas.

Not checked: "positive data acceptance" (schemathesis expects every schema-valid request to succeed). The schema
documents the static bounds of each field; a deployment's Limits (here 64x64, 20 steps) and rules across fields
(a mask needs an init image) are narrower, and those requests are rightly refused with 422.

Bounded: EXAMPLES per operation, derandomized (the same cases every run); the case count is printed."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

import dapple
from dapple.interfaces.server import create_app
from dapple.request import Limits
from dapple.service.jobs import JobService

EXAMPLES = 50
CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance]


@pytest.fixture(scope="module")
def schema(tmp_path_factory, tiny_model_dir):
    limits = Limits(max_width=64, max_height=64, max_steps=20, max_batch_size=2)
    pipe = dapple.load(tiny_model_dir, limits=limits)
    service = JobService(tmp_path_factory.mktemp("fuzz"), lambda: pipe, queue_size=100_000)
    service.start()
    yield schemathesis.openapi.from_asgi("/openapi.json", create_app(service, model_name="tiny"))
    service.stop()


def test_every_route_answers_within_its_schema_and_never_5xx(schema, capsys) -> None:
    cases, failures = 0, {}
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case) -> None:
            nonlocal cases
            cases += 1
            try:
                case.call_and_validate(checks=CHECKS)
            except (Exception, BaseExceptionGroup) as error:  # noqa: BLE001 - collect each operation's first
                failures.setdefault(label, f"{type(error).__name__}: {str(error)[:600]}")

        run()
    with capsys.disabled():
        print(f"\nschemathesis: {cases} cases over {len(list(schema.get_all_operations()))} operations")
    assert cases >= 20 * EXAMPLES
    assert not failures, "\n\n".join(f"{label}\n{message}" for label, message in failures.items())
