"""The OpenAPI 3.1 document of the admin API, served without auth at /admin/openapi.json.

Written by hand as plain JSON Schema, so it says exactly what `gateway.admin` answers: every
route, its parameters and body, and each status it can answer, errors included (all errors
have the body `{"error": code, "detail": sentence}`; see `gateway.app`). tests/test_openapi.py
checks the document against the live API.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.events import EventState
from gateway.settings import NAME_PATTERN

Schema = dict[str, Any]

STATES = [s.value for s in EventState]
# A path segment as Starlette matches it ([^/]+), less "." and "..", which clients resolve away.
SEGMENT = r"^[^/]*[^/.][^/]*$"


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: dict[str, Schema], *, optional: tuple[str, ...] = ()) -> Schema:
    """A closed object: every property but the optional ones is required, no others are allowed."""
    return {
        "type": "object",
        "properties": properties,
        "required": [k for k in properties if k not in optional],
        "additionalProperties": False,
    }


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


INT: Schema = {"type": "integer"}
COUNT: Schema = {"type": "integer", "minimum": 0}
STRING: Schema = {"type": "string"}
MS: Schema = {"type": "integer", "description": "milliseconds since the epoch"}
STATE: Schema = {"type": "string", "enum": STATES}

SCHEMAS: dict[str, Schema] = {
    "Error": _object(
        {
            "error": {"type": "string", "description": "a stable code, e.g. not_found"},
            "detail": {"type": "string", "description": "what went wrong, in a sentence"},
        }
    ),
    "Counts": _object(
        {
            "pending": COUNT,
            "in_flight": COUNT,
            "retrying": COUNT,
            "held": COUNT,
            "dead": COUNT,
            "delivered_24h": COUNT,
        }
    ),
    "Integration": _object(
        {
            "name": STRING,
            "mode": {"type": "string", "enum": ["relay", "proxy"]},
            "target": STRING,
            "state": {"type": "string", "enum": ["active", "paused"]},
            "paused_by": {"enum": ["operator", "failures", None]},
            "consecutive_failures": COUNT,
            "failure_threshold": INT,
            "held": COUNT,
            "last_error": _nullable(STRING),
            "last_failure_ms": _nullable(MS),
            "last_success_ms": _nullable(MS),
            "paused_ms": _nullable(MS),
            "next_probe_ms": _nullable(MS),
            "counts": _ref("Counts"),
            "cache": _nullable(
                {
                    **_object({"copies": COUNT, "bytes": COUNT}),
                    "description": "proxy mode: the last good answers kept (null in relay mode)",
                }
            ),
            "max_in_flight": {**COUNT, "description": "attempts in flight at once, across all workers"},
            "rate_limit_per_s": _nullable({"type": "number"}),
            "rate_limit_burst": _nullable(COUNT),
            "ordered": {"type": "boolean"},
            "waiting_until_ms": _nullable(
                {**MS, "description": "the endpoint asked it to wait until then (429/503 with Retry-After)"}
            ),
            "wait_reason": _nullable(STRING),
        }
    ),
    "IntegrationList": _object({"items": {"type": "array", "items": _ref("Integration")}}),
    "Status": _object(
        {
            "workers_live": COUNT,
            "queue_depth": COUNT,
            "integrations": {"type": "array", "items": _ref("Integration")},
        }
    ),
    "EventSummary": _object(
        {
            "id": STRING,
            "integration": STRING,
            "state": STATE,
            "attempt": COUNT,
            "received_ms": MS,
            "updated_ms": MS,
        }
    ),
    "EventPage": _object(
        {
            "items": {"type": "array", "items": _ref("EventSummary")},
            "next_cursor": _nullable(
                {"type": "string", "description": "pass as ?cursor= to get the next page"}
            ),
        }
    ),
    "Attempt": _object(
        {
            "n": COUNT,
            "at_ms": MS,
            "latency_ms": {"type": "number"},
            "status": _nullable(INT),
            "error": _nullable(STRING),
            "detail": STRING,
            "outcome": STRING,
            "body": STRING,
            "retry_in_s": {"type": "number"},
            "answered": {
                "type": "string",
                "enum": ["fresh", "hit", "stale", "error", "queued"],
                "description": "proxy mode: how the helpdesk was answered",
            },
        },
        optional=("retry_in_s", "answered"),
    ),
    "StoredRequest": _object(
        {
            "method": STRING,
            "url": STRING,
            "headers": {
                "type": "array",
                "description": "[name, value] pairs as received; credentials show as [redacted]",
                "items": {"type": "array", "prefixItems": [STRING, STRING], "minItems": 2, "maxItems": 2},
            },
            "body": _nullable({"type": "string", "description": "the body, when it is UTF-8"}),
            "body_base64": _nullable({"type": "string", "description": "the body, when it is not UTF-8"}),
        }
    ),
    "Event": _object(
        {
            "id": STRING,
            "integration": STRING,
            "state": STATE,
            "attempt": COUNT,
            "received_ms": MS,
            "updated_ms": MS,
            "attempts": {"type": "array", "items": _ref("Attempt")},
            "request": _ref("StoredRequest"),
        },
        optional=("request",),
    ),
    "EventReplay": _object({"id": STRING, "state": STATE, "attempt": COUNT}),
    "ReplayRequest": {
        "type": "object",
        "description": "no body, or {}, replays every dead event; an unknown field is a 422",
        "additionalProperties": False,
        "properties": {
            "integration": {"type": "string", "description": "only this integration's events"},
            "state": {**STATE, "default": "dead", "description": "only events in this state"},
            "since": {"type": "string", "description": "milliseconds since the epoch or ISO 8601"},
            "until": {"type": "string", "description": "milliseconds since the epoch or ISO 8601"},
        },
    },
    "ReplayFilter": _object(
        {"integration": _nullable(STRING), "state": STATE, "since": _nullable(MS), "until": _nullable(MS)}
    ),
    "ReplayJob": _object(
        {
            "id": STRING,
            "status": {"type": "string", "enum": ["running", "done", "cancelled"]},
            "matched": COUNT,
            "replayed": COUNT,
            "skipped": COUNT,
            "created_ms": MS,
            "filter": _ref("ReplayFilter"),
        }
    ),
}

ERRORS = {
    401: "no or a wrong bearer token, or the admin API is disabled (GATEWAY_ADMIN_TOKEN unset)",
    404: "no such route, or the named object does not exist",
    409: "a conflict: the event is neither delivered nor dead, or a bulk replay with this"
    " Idempotency-Key is still being started (ask again)",
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


def _query(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


INTEGRATION = _path("name", NAME_PATTERN, "the integration's name")
EVENT = _path("id", SEGMENT, "the event's id")
REPLAY = _path("id", SEGMENT, "the replay job's id")
TIME = "milliseconds since the epoch, or an ISO 8601 time (UTC unless it says otherwise)"
EVENT_FILTERS = [
    _query("integration", STRING, "only this integration's events (422 if none is so named)"),
    _query("state", STATE, "only events in this state"),
    _query("since", STRING, "received at or after: " + TIME),
    _query("until", STRING, "received at or before: " + TIME),
    _query("limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}, "page size"),
    _query("cursor", STRING, "the next_cursor of the previous page, unchanged"),
]

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
            "Events newest first, one page", (200, "a page of events", "EventPage"), (422,), EVENT_FILTERS
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
            (409, 422),
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
