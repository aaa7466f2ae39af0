"""The admin API under /admin: integrations, their health, pause and resume.

Every route needs `Authorization: Bearer $GATEWAY_ADMIN_TOKEN` (compared in constant time);
without a configured token the admin API answers 401 to everything.
"""

from __future__ import annotations

import base64
import hmac
import math
from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import shapes
from gateway.alerts import AlertKind, Alerts
from gateway.errors import Conflict, InvalidParameter, NotFound, PayloadTooLarge, Unauthorized
from gateway.events import EventState, StoredRequest, now_ms
from gateway.replays import ReplayJobs
from gateway.settings import REDACTED, Integration, Settings
from gateway.store import LATENCY_BUCKETS, Store


def answer(shape: shapes.Shape, status: int = 200) -> Response:
    return Response(shape.model_dump_json(), status, media_type="application/json")


def _int(value: str | None) -> int | None:
    return int(float(value)) if value else None


class Operations:
    """What an operator can see and do, as plain methods returning the admin shapes: the JSON API
    (`Admin`) and the dashboard (`gateway.ui`) are two faces of these, so both show the same
    figures with the same redaction."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        alerts: Alerts,
        on_state: Callable[[str], None] = lambda name: None,
    ) -> None:
        self._on_state = on_state  # a pause or resume through this process (proxy mode reads it)
        self._config = settings.config
        self._store = store
        self._alerts = alerts
        self._replays = ReplayJobs(settings.config, store)
        self._hidden = settings.config.gateway.credential_names | NEVER_SHOWN

    @property
    def names(self) -> list[str]:
        return [i.name for i in self._config.integrations]

    def integration(self, name: str) -> Integration:
        integration = self._config.integration(name)
        if integration is None or integration.internal:
            raise NotFound(f"no integration is named {name!r}")
        return integration

    async def describe(self, integration: Integration) -> shapes.Integration:
        health = await self._store.health(integration.name)
        paused = health.get("state") == "paused"
        waiting_until = _int(health.get("wait_until")) or 0
        cache = None
        if integration.mode == "proxy":
            ((copies, size),) = await self._store.copies([integration.name])
            cache = shapes.Cache(copies=copies, bytes=size)
        waiting = waiting_until > now_ms()
        return shapes.Integration(
            name=integration.name,
            mode=integration.mode,
            target=integration.redact(str(integration.target)),
            state="paused" if paused else "active",
            paused_by=("operator" if health.get("manual") == "1" else "failures") if paused else None,
            draining=not paused and "draining" in health,
            consecutive_failures=int(health.get("fails", 0)),
            failure_threshold=integration.failure_threshold,
            held=health["held"],
            last_error=health.get("last_error"),
            last_failure_ms=_int(health.get("last_failure_ms")),
            last_success_ms=_int(health.get("last_success_ms")),
            paused_ms=_int(health.get("paused_ms")) if paused else None,
            counts=shapes.Counts(**await self._store.counts(integration.name, now_ms())),
            next_probe_ms=_int(health.get("probe_ms"))
            if paused and integration.probe and health.get("manual") != "1"
            else None,
            cache=cache,
            max_in_flight=integration.slots,
            rate_limit_per_s=integration.rate_limit_per_s,
            rate_limit_burst=integration.burst if integration.rate_limit_per_s is not None else None,
            ordered=integration.ordered,
            waiting_until_ms=waiting_until if waiting else None,
            wait_reason=health.get("wait_reason") if waiting else None,
        )

    async def activity(self, minutes: int = 60) -> dict[str, shapes.Activity]:
        """Per integration: delivered and failed attempts per minute, and latency p50/p95, from the
        per-minute figures the scripts keep (so the dashboard charts without Prometheus)."""
        per_minute = await self._store.minutes(now_ms(), minutes)
        indexes = range(len(LATENCY_BUCKETS) + 1)
        out = {}
        for name in self.names:
            delivered = [[m.get(f"{name}|d{b}", 0) for b in indexes] for m in per_minute]
            failed = [[m.get(f"{name}|f{b}", 0) for b in indexes] for m in per_minute]
            buckets = [sum(d[b] + f[b] for d, f in zip(delivered, failed, strict=True)) for b in indexes]
            out[name] = shapes.Activity(
                delivered=[sum(d) for d in delivered],
                failed=[sum(f) for f in failed],
                p50_ms=_quantile_ms(buckets, 0.5),
                p95_ms=_quantile_ms(buckets, 0.95),
            )
        return out

    async def integrations(self) -> list[shapes.Integration]:
        return [await self.describe(i) for i in self._config.integrations]

    async def pause(self, name: str) -> shapes.Integration:
        integration = self.integration(name)
        before, held = await self._store.set_state(integration.name, "pause", manual=True)
        self._on_state(integration.name)
        info = await self.describe(integration)
        if before != "paused":
            await self._alerts.send(
                AlertKind.PAUSED,
                integration.name,
                consecutive_failures=info.consecutive_failures,
                last_error=info.last_error or "",
                held=held,
                reason="by an operator",
            )
        return info

    async def resume(self, name: str) -> shapes.Integration:
        integration = self.integration(name)
        before, held = await self._store.set_state(integration.name, "resume", manual=True)
        self._on_state(integration.name)
        if before == "paused":
            await self._alerts.send(
                AlertKind.RESUMED,
                integration.name,
                consecutive_failures=0,
                held=held,
                reason="by an operator",
            )
        return await self.describe(integration)

    async def events(self, query: shapes.EventQuery) -> shapes.EventPage:
        """Events newest first, one page."""
        names = self.names
        if query.integration is not None:
            names = [_known_integration(query.integration, names)]
        states = [query.state.value] if query.state else [s.value for s in EventState]
        items, next_cursor = await self._store.list_events(
            names, states, query.since, query.until, query.limit, _cursor(query.cursor)
        )
        return shapes.EventPage(
            items=[shapes.EventSummary(**i) for i in items],
            next_cursor=f"{next_cursor[0]!r}_{next_cursor[1]}" if next_cursor else None,
        )

    async def event(self, event_id: str) -> shapes.Event:
        """The request as received (credential headers redacted) and every attempt."""
        event = await self._store.event(event_id)
        if event is None:
            raise NotFound(f"no event has the id {event_id!r} (or it has been removed)")
        blob = event.pop("request_blob")
        if blob is not None:
            stored = StoredRequest.unpack(blob)
            try:
                text, raw = stored.body.decode("utf-8"), None
            except UnicodeDecodeError:
                text, raw = None, base64.b64encode(stored.body).decode()
            integration = self._config.integration(event["integration"])
            hidden = self._hidden
            event["request"] = shapes.StoredRequest(
                method=stored.method,
                url=stored.url if integration is None else integration.redact(stored.url),
                headers=[(k, REDACTED if k.lower() in hidden else v) for k, v in stored.headers],
                body=text,
                body_base64=raw,
            )
        return shapes.Event.model_validate(event)

    async def status(self) -> shapes.Status:
        """Live workers, the attempts scheduled (due now or later), and every integration."""
        workers = await self._store.live_workers()
        depth = await self._store.scheduled(
            [i.name for i in [*self._config.integrations, *self._config.alert_sinks]]
        )
        return shapes.Status(workers_live=workers, queue_depth=depth, integrations=await self.integrations())

    async def replay_event(self, event_id: str) -> shapes.EventReplay:
        """Sends a delivered or dead event again, with the same webhook-id."""
        meta = await self._store.meta(event_id)
        if meta is None:
            raise NotFound(f"no event has the id {event_id!r} (or it has been removed)")
        current, attempt, integration, _ = meta
        state = await self._store.replay(event_id, attempt, integration, "replay requested by an operator")
        if state is None:
            raise Conflict(f"event {event_id} is {current}: only delivered or dead events are replayed")
        return shapes.EventReplay(id=event_id, state=EventState(state), attempt=attempt + 1)

    async def start_replay(self, body: shapes.ReplayRequest, idempotency_key: str | None) -> shapes.ReplayJob:
        """Bulk replay of the events matching a filter (state defaults to dead)."""
        if body.integration is not None:
            _known_integration(body.integration, self.names)
        selection = shapes.ReplayFilter(**body.model_dump())
        return await self._replays.start(selection, idempotency_key)

    async def replay_job(self, replay_id: str) -> shapes.ReplayJob:
        return _found_replay(replay_id, await self._replays.get(replay_id))

    async def cancel_replay(self, replay_id: str) -> shapes.ReplayJob:
        return _found_replay(replay_id, await self._replays.cancel(replay_id))


def _quantile_ms(buckets: list[int], q: float) -> float | None:
    """The upper bound (ms) of the latency bucket that holds quantile q; inf past the last one."""
    total = sum(buckets)
    if total == 0:
        return None
    seen = 0
    for index, n in enumerate(buckets):
        seen += n
        if seen >= q * total:
            return LATENCY_BUCKETS[index] * 1000 if index < len(LATENCY_BUCKETS) else math.inf
    return math.inf


def _found_replay(replay_id: str, job: shapes.ReplayJob | None) -> shapes.ReplayJob:
    if job is None:
        raise NotFound(f"no bulk replay has the id {replay_id!r}")
    return job


class Admin:
    """The JSON face of `Operations`, behind the bearer token."""

    def __init__(self, settings: Settings, operations: Operations) -> None:
        self._token = settings.admin_token.get_secret_value().encode() if settings.admin_token else None
        self.operations = operations

    def routes(self) -> list[Route]:
        return [
            Route("/admin/integrations", self.list_integrations, methods=["GET"]),
            Route("/admin/integrations/{name}", self.get_integration, methods=["GET"]),
            Route("/admin/integrations/{name}/pause", self.pause, methods=["POST"]),
            Route("/admin/integrations/{name}/resume", self.resume, methods=["POST"]),
            Route("/admin/events", self.list_events, methods=["GET"]),
            Route("/admin/events/{id}", self.get_event, methods=["GET"]),
            Route("/admin/events/{id}/replay", self.replay_event, methods=["POST"]),
            Route("/admin/status", self.status, methods=["GET"]),
            Route("/admin/replay", self.start_replay, methods=["POST"]),
            Route("/admin/replays/{id}", self.get_replay, methods=["GET"]),
            Route("/admin/replays/{id}/cancel", self.cancel_replay, methods=["POST"]),
        ]

    def _authorize(self, request: Request) -> Operations:
        if self._token is None:
            raise Unauthorized("the admin API is disabled: start the gateway with GATEWAY_ADMIN_TOKEN set")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
            raise Unauthorized("send Authorization: Bearer <GATEWAY_ADMIN_TOKEN>")
        return self.operations

    async def list_integrations(self, request: Request) -> Response:
        return answer(shapes.IntegrationList(items=await self._authorize(request).integrations()))

    async def get_integration(self, request: Request) -> Response:
        ops = self._authorize(request)
        return answer(await ops.describe(ops.integration(request.path_params["name"])))

    async def pause(self, request: Request) -> Response:
        return answer(await self._authorize(request).pause(request.path_params["name"]))

    async def resume(self, request: Request) -> Response:
        return answer(await self._authorize(request).resume(request.path_params["name"]))

    async def list_events(self, request: Request) -> Response:
        """Events newest first: ?integration=&state=&since=&until=&limit=&cursor=."""
        ops = self._authorize(request)
        query = shapes.parse(shapes.EventQuery, {k: v for k, v in request.query_params.items() if v})
        return answer(await ops.events(query))

    async def get_event(self, request: Request) -> Response:
        return answer(await self._authorize(request).event(request.path_params["id"]))

    async def status(self, request: Request) -> Response:
        return answer(await self._authorize(request).status())

    async def start_replay(self, request: Request) -> Response:
        ops = self._authorize(request)
        body = shapes.parse(shapes.ReplayRequest, await _json_body(request))
        return answer(await ops.start_replay(body, request.headers.get("idempotency-key")), 202)

    async def get_replay(self, request: Request) -> Response:
        return answer(await self._authorize(request).replay_job(request.path_params["id"]))

    async def cancel_replay(self, request: Request) -> Response:
        return answer(await self._authorize(request).cancel_replay(request.path_params["id"]))

    async def replay_event(self, request: Request) -> Response:
        return answer(await self._authorize(request).replay_event(request.path_params["id"]), 202)


# Shown in no event, beside the credential headers of the config (sealed at rest, too).
NEVER_SHOWN = frozenset({"x-auth-token", "idempotency-key"})


def _cursor(value: str | None) -> tuple[float, str] | None:
    if not value:
        return None
    score, _, event_id = value.partition("_")
    try:
        parsed = float(score)
    except ValueError:
        raise InvalidParameter("cursor: pass back the next_cursor of the previous page unchanged") from None
    if not math.isfinite(parsed) or not event_id or not (event_id.isascii() and event_id.isalnum()):
        raise InvalidParameter("cursor: pass back the next_cursor of the previous page unchanged")
    return parsed, event_id


MAX_ADMIN_BODY = 64 * 1024  # an admin body is a small filter; a larger one is refused unread


async def _json_body(request: Request) -> dict[str, Any]:
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_ADMIN_BODY:
            raise PayloadTooLarge(f"an admin request body is at most {MAX_ADMIN_BODY} bytes")
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidParameter("body: not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidParameter("body: must be a JSON object")
    return body


def _known_integration(name: str, names: list[str]) -> str:
    if name not in names:
        raise InvalidParameter(f"integration: no integration is named {name!r}")
    return name
