"""The OpenAPI 3.1 document of the admin API, served without auth at /admin/openapi.json.

The paths table is written here: every route, its parameters and body, and each status it can
answer, errors included (all errors have the body `{"error": code, "detail": sentence}`; see
`gateway.errors`). The schemas of bodies and query parameters are generated from the models in
`gateway.shapes`, which `gateway.admin` validates and answers with. tests/test_openapi.py checks
the document against the live API.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import Response

from gateway import shapes
from gateway.settings import NAME_PATTERN

Schema = dict[str, Any]

# A path segment as Starlette matches it ([^/]+), less "." and "..", which clients resolve away.
SEGMENT = r"^[^/]*[^/.][^/]*$"

ANSWERS: list[type[BaseModel]] = [
    shapes.Error,
    shapes.IntegrationList,
    shapes.Integration,
    shapes.Status,
    shapes.EventPage,
    shapes.Event,
    shapes.EventReplay,
    shapes.ReplayJob,
]
REQUESTS: list[type[BaseModel]] = [shapes.ReplayRequest, shapes.EventQuery]


def _schemas() -> dict[str, Schema]:
    """The components' schemas, generated from `gateway.shapes` (answers as they are serialized,
    requests as they are validated)."""
    _, top = models_json_schema(
        [(m, "serialization") for m in ANSWERS] + [(m, "validation") for m in REQUESTS],
        ref_template="#/components/schemas/{model}",
    )
    return dict(top["$defs"])


SCHEMAS = _schemas()


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _query_parameters(model: type[BaseModel]) -> list[Schema]:
    """One optional query parameter per field of a request model, described by its schema."""
    properties = SCHEMAS[model.__name__]["properties"]
    parameters = []
    for name, schema in properties.items():
        schema = {k: v for k, v in schema.items() if k not in ("title", "description")}
        description = model.model_fields[name].description or name
        parameters.append(
            {"name": name, "in": "query", "required": False, "description": description, "schema": schema}
        )
    return parameters


STRING: Schema = {"type": "string"}

ERRORS = {
    401: "no or a wrong bearer token, or the admin API is disabled (GATEWAY_ADMIN_TOKEN unset)",
    404: "no such route, or the named object does not exist",
    409: "a conflict: the event is neither delivered nor dead, or a bulk replay with this"
    " Idempotency-Key is still being started (ask again)",
    413: "the body is larger than 64 KiB",
    422: "a parameter or the body cannot be used; `detail` names it",
    503: "Redis is not reachable",
}


def _json(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _operation(
    summary: str,
    ok: tuple[int, str, str],
    errors: tuple[int, ...] = (),
    parameters: list[Schema] | None = None,
    body: str | None = None,
    body_required: bool = True,
) -> Schema:
    status, description, schema = ok
    responses = {str(status): _json(description, _ref(schema))}
    for code in sorted({401, 503, *errors}):
        responses[str(code)] = _json(ERRORS[code], _ref("Error"))
    operation: Schema = {"summary": summary, "parameters": parameters or [], "responses": responses}
    if body is not None:
        operation["requestBody"] = {
            "required": body_required,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    return operation


def _path(name: str, pattern: str, description: str) -> Schema:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "pattern": pattern},
    }


INTEGRATION = _path("name", NAME_PATTERN, "the integration's name")
EVENT = _path("id", SEGMENT, "the event's id")
REPLAY = _path("id", SEGMENT, "the replay job's id")
PATHS: dict[str, Schema] = {
    "/admin/integrations": {
        "get": _operation("Every integration and its health", (200, "the integrations", "IntegrationList")),
    },
    "/admin/integrations/{name}": {
        "parameters": [INTEGRATION],
        "get": _operation("One integration and its health", (200, "the integration", "Integration"), (404,)),
    },
    "/admin/integrations/{name}/pause": {
        "parameters": [INTEGRATION],
        "post": _operation(
            "Pause deliveries until an operator resumes",
            (200, "the paused integration", "Integration"),
            (404,),
        ),
    },
    "/admin/integrations/{name}/resume": {
        "parameters": [INTEGRATION],
        "post": _operation(
            "Resume deliveries, held events first", (200, "the resumed integration", "Integration"), (404,)
        ),
    },
    "/admin/events": {
        "get": _operation(
            "Events newest first, one page",
            (200, "a page of events", "EventPage"),
            (422,),
            _query_parameters(shapes.EventQuery),
        ),
    },
    "/admin/events/{id}": {
        "parameters": [EVENT],
        "get": _operation(
            "An event: the request as received (credentials redacted) and every attempt",
            (200, "the event", "Event"),
            (404,),
        ),
    },
    "/admin/events/{id}/replay": {
        "parameters": [EVENT],
        "post": _operation(
            "Send a delivered or dead event again, with the same webhook-id",
            (202, "the event is queued again", "EventReplay"),
            (404, 409),
        ),
    },
    "/admin/status": {
        "get": _operation("Live workers, queue depth and every integration", (200, "the status", "Status")),
    },
    "/admin/replay": {
        "post": _operation(
            "Replay every event that matches a filter, in the background",
            (202, "the replay job, started", "ReplayJob"),
            (409, 413, 422),
            [
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "description": "a repeated key answers the job it started",
                    "schema": STRING,
                }
            ],
            body="ReplayRequest",
            body_required=False,
        ),
    },
    "/admin/replays/{id}": {
        "parameters": [REPLAY],
        "get": _operation("A replay job's progress", (200, "the replay job", "ReplayJob"), (404,)),
    },
    "/admin/replays/{id}/cancel": {
        "parameters": [REPLAY],
        "post": _operation("Stop a replay job", (200, "the replay job", "ReplayJob"), (404,)),
    },
    "/admin/openapi.json": {
        "get": {
            "summary": "This document",
            "security": [],
            "responses": {"200": _json("the OpenAPI document", {"type": "object"})},
        },
    },
}


def document(base_url: str | None = None) -> dict[str, Any]:
    """The OpenAPI document of the admin API; `base_url` becomes its server."""
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "webhook-gateway admin API",
            "version": "1",
            "description": "Every route but this document needs"
            " `Authorization: Bearer $GATEWAY_ADMIN_TOKEN`.",
        },
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
    if base_url is not None:
        doc["servers"] = [{"url": base_url.rstrip("/")}]
    # A deep copy, so a caller (or a tool that rewrites references) never changes the module's dicts.
    return dict(orjson.loads(orjson.dumps(doc)))


async def openapi_endpoint(request: Request) -> Response:
    """GET /admin/openapi.json: the document, with this request's origin as the server. No auth."""
    body = orjson.dumps(document(str(request.base_url)))
    return Response(body, media_type="application/json")
