"""The admin API under /admin: integrations, their health, pause and resume.

Every route needs `Authorization: Bearer $GATEWAY_ADMIN_TOKEN` (compared in constant time);
without a configured token the admin API answers 401 to everything.
"""

from __future__ import annotations

import base64
import hmac
import math
from collections.abc import Awaitable, Callable
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
from gateway.store import Store


def answer(shape: shapes.Shape, status: int = 200) -> Response:
    return Response(shape.model_dump_json(), status, media_type="application/json")


def _int(value: str | None) -> int | None:
    return int(float(value)) if value else None


class Admin:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        alerts: Alerts,
        on_state: Callable[[str], None] = lambda name: None,
    ) -> None:
        self._on_state = on_state  # a pause or resume through this process (proxy mode reads it)
        self._config = settings.config
        self._token = settings.admin_token.get_secret_value().encode() if settings.admin_token else None
        self._store = store
        self._alerts = alerts
        self._replays = ReplayJobs(settings.config, store)
        self._hidden = settings.config.gateway.credential_names | NEVER_SHOWN

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

    def _authorize(self, request: Request) -> None:
        if self._token is None:
            raise Unauthorized("the admin API is disabled: start the gateway with GATEWAY_ADMIN_TOKEN set")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
            raise Unauthorized("send Authorization: Bearer <GATEWAY_ADMIN_TOKEN>")

    def _integration(self, request: Request) -> Integration:
        self._authorize(request)
        name = request.path_params["name"]
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

    async def list_integrations(self, request: Request) -> Response:
        self._authorize(request)
        items = [await self.describe(i) for i in self._config.integrations]
        return answer(shapes.IntegrationList(items=items))

    async def get_integration(self, request: Request) -> Response:
        return answer(await self.describe(self._integration(request)))

    async def pause(self, request: Request) -> Response:
        integration = self._integration(request)
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
        return answer(info)

    async def resume(self, request: Request) -> Response:
        integration = self._integration(request)
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
        return answer(await self.describe(integration))

    async def list_events(self, request: Request) -> Response:
        """Events newest first: ?integration=&state=&since=&until=&limit=&cursor=."""
        self._authorize(request)
        query = shapes.parse(shapes.EventQuery, {k: v for k, v in request.query_params.items() if v})
        names = [i.name for i in self._config.integrations]
        if query.integration is not None:
            names = [_known_integration(query.integration, names)]
        states = [query.state.value] if query.state else [s.value for s in EventState]
        items, next_cursor = await self._store.list_events(
            names, states, query.since, query.until, query.limit, _cursor(query.cursor)
        )
        return answer(
            shapes.EventPage(
                items=[shapes.EventSummary(**i) for i in items],
                next_cursor=f"{next_cursor[0]!r}_{next_cursor[1]}" if next_cursor else None,
            )
        )

    async def get_event(self, request: Request) -> Response:
        """The request as received (credential headers redacted) and every attempt."""
        self._authorize(request)
        event = await self._store.event(request.path_params["id"])
        if event is None:
            raise NotFound(f"no event has the id {request.path_params['id']!r} (or it has been removed)")
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
        return answer(shapes.Event.model_validate(event))

    async def status(self, request: Request) -> Response:
        """Live workers, the attempts scheduled (due now or later), and every integration."""
        self._authorize(request)
        workers = await self._store.live_workers()
        depth = await self._store.scheduled(
            [i.name for i in [*self._config.integrations, *self._config.alert_sinks]]
        )
        items = [await self.describe(i) for i in self._config.integrations]
        return answer(shapes.Status(workers_live=workers, queue_depth=depth, integrations=items))

    async def start_replay(self, request: Request) -> Response:
        """Bulk replay of the events matching a filter (state defaults to dead)."""
        self._authorize(request)
        body = shapes.parse(shapes.ReplayRequest, await _json_body(request))
        if body.integration is not None:
            _known_integration(body.integration, [i.name for i in self._config.integrations])
        selection = shapes.ReplayFilter(**body.model_dump())
        job = await self._replays.start(selection, request.headers.get("idempotency-key"))
        return answer(job, 202)

    async def get_replay(self, request: Request) -> Response:
        return await self._replay_job(request, self._replays.get)

    async def cancel_replay(self, request: Request) -> Response:
        return await self._replay_job(request, self._replays.cancel)

    async def _replay_job(
        self, request: Request, act: Callable[[str], Awaitable[shapes.ReplayJob | None]]
    ) -> Response:
        self._authorize(request)
        job = await act(request.path_params["id"])
        if job is None:
            raise NotFound(f"no bulk replay has the id {request.path_params['id']!r}")
        return answer(job)

    async def replay_event(self, request: Request) -> Response:
        """Sends a delivered or dead event again, with the same webhook-id."""
        self._authorize(request)
        event_id = request.path_params["id"]
        meta = await self._store.meta(event_id)
        if meta is None:
            raise NotFound(f"no event has the id {event_id!r} (or it has been removed)")
        current, attempt, integration, _ = meta
        state = await self._store.replay(event_id, attempt, integration, "replay requested by an operator")
        if state is None:
            raise Conflict(f"event {event_id} is {current}: only delivered or dead events are replayed")
        return answer(shapes.EventReplay(id=event_id, state=EventState(state), attempt=attempt + 1), 202)


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
