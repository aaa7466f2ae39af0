"""The admin API's OpenAPI document: valid, and true of the live API (property-based, schemathesis)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema

from gateway.openapi import document
from tests.conftest import Gateway, InProcessGateway, free_port, integration_toml, wait_until
from tests.upstream import Upstream

TOKEN = "test-admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 60  # per operation: about 10 s in all


def test_the_document_is_valid_openapi_and_covers_every_admin_route() -> None:
    doc = document("http://gateway.example:8080")
    schema = schemathesis.openapi.from_dict(doc)
    schema.validate()  # raises on a document the OpenAPI 3.1 meta-schema rejects
    labels = {operation.label for operation in _operations(schema)}
    assert labels == {
        "GET /admin/status",
        "GET /admin/integrations",
        "GET /admin/integrations/{name}",
        "POST /admin/integrations/{name}/pause",
        "POST /admin/integrations/{name}/resume",
        "GET /admin/events",
        "GET /admin/events/{id}",
        "POST /admin/events/{id}/replay",
        "POST /admin/replay",
        "GET /admin/replays/{id}",
        "POST /admin/replays/{id}/cancel",
        "GET /admin/openapi.json",
    }
    assert doc["servers"] == [{"url": "http://gateway.example:8080"}]
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            codes = set(operation["responses"])
            if path != "/admin/openapi.json":
                assert {"401", "503"} <= codes, f"{method.upper()} {path}"
                assert "security" not in operation  # so the document-wide bearer scheme applies
            if "{" in path:
                assert "404" in codes, f"{method.upper()} {path}"


def test_the_live_api_answers_as_documented(gateway: Gateway, upstream: Upstream) -> None:
    gateway.extra_env["GATEWAY_ADMIN_TOKEN"] = TOKEN
    refused = f"http://127.0.0.1:{free_port()}"
    gateway.configure(
        integration_toml("crm", upstream.url), integration_toml("erp", refused, retry={"max_attempts": 1})
    ).start()
    ids = [gateway.post(f"/hooks/{name}").json()["id"] for name in ["crm", "crm", "erp", "erp"]]
    wait_until(lambda: _event_states(gateway, ids) == {"delivered", "dead"})

    served = httpx.get(gateway.url + "/admin/openapi.json", timeout=10)
    assert served.status_code == 200, "wire Route('/admin/openapi.json', openapi_endpoint) in gateway.app"
    assert served.json() == document(gateway.url)

    job = httpx.post(gateway.url + "/admin/replay", json={"state": "delivered"}, headers=AUTH, timeout=10)
    assert job.status_code == 202, job.text
    schema = schemathesis.openapi.from_dict(served.json())
    failures: list[str] = []
    for operation in _operations(schema):

        @given(case=operation.as_strategy(), real=st.booleans(), pick=st.integers(0, len(ids) - 1))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def conforms(case: schemathesis.Case[Any], real: bool, pick: int) -> None:
            # Half the cases name a real integration or event, so 200s get checked too, not only 404s.
            if real and case.path_parameters:
                if "name" in case.path_parameters:
                    case.path_parameters["name"] = ["crm", "erp"][pick % 2]
                if "id" in case.path_parameters:
                    replays = case.operation.path.startswith("/admin/replays/")
                    case.path_parameters["id"] = job.json()["id"] if replays else ids[pick]
            case.call_and_validate(base_url=gateway.url, headers=AUTH, checks=CHECKS)

        try:
            conforms()
        except Exception as exc:
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.in_process
def test_without_the_token_every_admin_route_answers_401(
    in_process_gateway: InProcessGateway, upstream: Upstream
) -> None:
    gateway = in_process_gateway
    gateway.extra_env["GATEWAY_ADMIN_TOKEN"] = TOKEN
    gateway.configure(integration_toml("crm", upstream.url)).start()
    for path, item in document()["paths"].items():
        for method in item.keys() - {"parameters"}:
            if path == "/admin/openapi.json":
                continue
            url = path.replace("{name}", "crm").replace("{id}", "x")
            answer = gateway.request(method, url, json={}, headers={"authorization": "Bearer nope"})
            assert answer.status_code == 401, f"{method.upper()} {path}"
            assert answer.json()["error"] == "unauthorized"


@pytest.mark.in_process
def test_unusable_times_and_cursors_answer_422_not_5xx(
    in_process_gateway: InProcessGateway, upstream: Upstream
) -> None:
    """Found by fuzzing: "²".isdigit() holds but int("²") raises; a "nan" cursor reaches Redis."""
    gateway = in_process_gateway
    gateway.extra_env["GATEWAY_ADMIN_TOKEN"] = TOKEN
    gateway.configure(integration_toml("crm", upstream.url)).start()
    for params in [{"since": "²"}, {"until": "1²"}, {"cursor": "nan_abc"}, {"cursor": "-nan_abc"}]:
        answer = gateway.get("/admin/events", params=params, headers=AUTH, timeout=10)
        assert answer.status_code == 422, f"{params}: {answer.status_code} {answer.text}"
    for body in [{"since": "²"}, {"until": "1²"}]:
        answer = gateway.request("POST", "/admin/replay", json=body, headers=AUTH, timeout=10)
        assert answer.status_code == 422, f"{body}: {answer.status_code} {answer.text}"


def _event_states(gateway: Gateway, ids: list[str]) -> set[str]:
    states = set()
    for event_id in ids:
        answer = httpx.get(f"{gateway.url}/admin/events/{event_id}", headers=AUTH, timeout=10)
        states.add(answer.json()["state"])
    return states


def _operations(schema: OpenApiSchema) -> Iterator[schemathesis.APIOperation[Any, Any, Any, Any]]:
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"an operation the document describes cannot be used: {result}"
        yield result.ok()
