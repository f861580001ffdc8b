"""A bounded schema fuzz of the native API: random JSON bodies and query values never produce a 5xx."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dapple.interfaces.server import create_app
from dapple.request import GenerationRequest
from dapple.service.jobs import JobService

FIELDS = sorted(GenerationRequest.model_fields)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=30), st.sampled_from(["Euler a", "DPM++ 2M Karras", "crop and resize",
                                                          "Latent", "data:image/png;base64,AAAA", "", "-1"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5),
                                                                                             inner, max_size=3),
                      max_leaves=5)
bodies = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), values, max_size=8)


@pytest.fixture(scope="module")
def client(tmp_path_factory, pipe):
    service = JobService(tmp_path_factory.mktemp("data"), lambda: pipe, queue_size=100_000)  # never started
    with TestClient(create_app(service), raise_server_exceptions=False) as test_client:
        yield test_client


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(bodies, values))
def test_job_submission_never_answers_5xx(client, body) -> None:
    response = client.post("/api/v1/jobs", json=body)
    assert response.status_code < 500, (body, response.text)
    assert response.status_code in (202, 404, 422)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_raw_bodies_never_answer_5xx(client, raw) -> None:
    response = client.post("/api/v1/jobs", content=raw, headers={"content-type": "application/json"})
    assert response.status_code in (202, 400, 404, 422), (raw, response.text)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(job_id=st.text(st.characters(codec="ascii", exclude_characters="/?#%", min_codepoint=33, max_codepoint=126), max_size=40),
       status=st.text(max_size=10), number=st.integers(-10**12, 10**12))
def test_queries_never_answer_5xx(client, job_id, status, number) -> None:
    for path, params in ((f"/api/v1/jobs/{job_id}", None), ("/api/v1/jobs", {"status": status, "limit": number}),
                         ("/api/v1/images", {"offset": number, "limit": number}),
                         (f"/api/v1/images/{job_id}/thumbnail", {"size": number})):
        assert client.get(path, params=params).status_code < 500
