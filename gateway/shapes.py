"""The admin API's shapes, written once.

Each request and answer of /admin is a pydantic model here. The admin routes validate what they
are sent with the request models (a refusal is the usual 422 JSON error, naming the field) and
build their answers as the response models; the OpenAPI document's schemas are generated from
these classes (`gateway.openapi`); the operator commands parse the answers back into them and
print their columns from the attributes (`gateway.client`). Rename a field here and all three
follow, or mypy says where they do not.

Response models are closed (`extra="forbid"`, so the document says `additionalProperties:
false`) and every field is required unless it is one of the few that an answer may leave out
(`omitted`): those are dropped when they are None, never sent as null.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
)

from gateway.errors import InvalidParameter
from gateway.events import AttemptRecord, EventState

DEFAULT_PAGE = 50
MAX_PAGE = 500

Count = Annotated[int, Field(ge=0)]
Ms = Annotated[int, Field(description="milliseconds since the epoch")]
TIME = "milliseconds since the epoch, or an ISO 8601 time (UTC unless it says otherwise)"


def _time_ms(value: Any) -> int | None:
    """Milliseconds since the epoch (a number, or a string of digits), or an ISO 8601 time."""
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise ValueError("use milliseconds since the epoch or an ISO 8601 time")
    if value.isascii() and value.isdigit():
        return int(value)
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError("use milliseconds since the epoch or an ISO 8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


# A time as a client writes it; validated into milliseconds since the epoch.
Time = Annotated[
    int | None,
    BeforeValidator(_time_ms),
    WithJsonSchema({"type": ["string", "integer"], "description": TIME}),
]


class Shape(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def omitted(description: str) -> Any:
    """A field an answer leaves out when it has nothing to say (never null)."""
    return Field(default=None, description=description, exclude_if=lambda v: v is None)


class Error(Shape):
    """Every error's body."""

    error: str = Field(description="a stable code, e.g. not_found")
    detail: str = Field(description="what went wrong, in a sentence")


class Counts(Shape):
    pending: Count
    in_flight: Count
    retrying: Count
    held: Count
    dead: Count
    delivered_24h: Count


class Cache(Shape):
    """Proxy mode: the last good answers kept."""

    copies: Count
    bytes: Count


class Integration(Shape):
    """An integration, its health and its limits."""

    name: str
    mode: Literal["relay", "proxy"]
    target: str
    state: Literal["active", "paused"]
    paused_by: Literal["operator", "failures"] | None
    draining: bool = Field(description="resumed, and still sending the events it held, in arrival order")
    consecutive_failures: Count
    failure_threshold: int
    held: Count
    last_error: str | None
    last_failure_ms: Ms | None
    last_success_ms: Ms | None
    paused_ms: Ms | None
    next_probe_ms: Ms | None
    counts: Counts
    cache: Cache | None = Field(description="proxy mode: the last good answers kept (null in relay mode)")
    max_in_flight: Count = Field(description="attempts in flight at once, across all workers")
    rate_limit_per_s: float | None
    rate_limit_burst: Count | None
    ordered: bool
    waiting_until_ms: Ms | None = Field(
        description="the endpoint asked it to wait until then (429/503 with Retry-After)"
    )
    wait_reason: str | None


class Activity(Shape):
    """An integration's attempts per minute over the last hour (oldest first), for the dashboard."""

    delivered: list[Count] = Field(description="attempts delivered, per minute")
    failed: list[Count] = Field(description="attempts that failed, per minute")
    p50_ms: float | None = Field(description="median latency over the hour: the upper bound of its bucket")
    p95_ms: float | None = Field(description="95th percentile latency: the upper bound of its bucket")


class IntegrationList(Shape):
    items: list[Integration]


class Status(Shape):
    workers_live: Count
    queue_depth: Count
    integrations: list[Integration]


class EventSummary(Shape):
    id: str
    integration: str
    state: EventState
    attempt: Count
    received_ms: Ms
    updated_ms: Ms


class EventPage(Shape):
    items: list[EventSummary]
    next_cursor: str | None = Field(description="pass as ?cursor= to get the next page")


class StoredRequest(Shape):
    """The request as received; credential headers show as [redacted]."""

    method: str
    url: str
    headers: list[tuple[str, str]] = Field(description="[name, value] pairs as received")
    body: str | None = Field(description="the body, when it is UTF-8")
    body_base64: str | None = Field(description="the body, when it is not UTF-8")


class Event(EventSummary):
    attempts: list[AttemptRecord]
    request: StoredRequest | None = omitted("the request, until retention removes it")


class EventReplay(Shape):
    id: str
    state: EventState
    attempt: Count


class ReplayFilter(Shape):
    """Which events a bulk replay matches: all of them where a field is null."""

    integration: str | None
    state: EventState
    since: Ms | None
    until: Ms | None


class ReplayJob(Shape):
    id: str
    status: Literal["running", "done", "cancelled"]
    matched: Count
    replayed: Count
    skipped: Count
    created_ms: Ms
    filter: ReplayFilter


# Requests ------------------------------------------------------------------------------------


class ReplayRequest(Shape):
    """The body of POST /admin/replay: no body, or {}, replays every dead event."""

    integration: str | None = Field(default=None, description="only this integration's events")
    state: EventState = Field(default=EventState.DEAD, description="only events in this state")
    since: Time = Field(default=None, description="received at or after: " + TIME)
    until: Time = Field(default=None, description="received at or before: " + TIME)


class EventQuery(Shape):
    """The query of GET /admin/events."""

    integration: str | None = Field(
        default=None, description="only this integration's events (422 if none is so named)"
    )
    state: EventState | None = Field(default=None, description="only events in this state")
    since: Time = Field(default=None, description="received at or after: " + TIME)
    until: Time = Field(default=None, description="received at or before: " + TIME)
    limit: int = Field(default=DEFAULT_PAGE, ge=1, le=MAX_PAGE, description="page size")
    cursor: Annotated[str, StringConstraints(max_length=200)] | None = Field(
        default=None, description="the next_cursor of the previous page, unchanged"
    )


M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], data: Any) -> M:
    """`data` as a `model`, or InvalidParameter (422) naming the first field that is wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        message = str(first["msg"])
        if first["type"] == "extra_forbidden":
            message = "unknown field"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        raise InvalidParameter(f"{where}: {message[:1].lower()}{message[1:]}") from None
