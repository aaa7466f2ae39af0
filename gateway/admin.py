"""The admin API under /admin: integrations, their health, pause and resume.

Every route needs `Authorization: Bearer $GATEWAY_ADMIN_TOKEN` (compared in constant time);
without a configured token the admin API answers 401 to everything.
"""

from __future__ import annotations

import hmac
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.alerts import AlertKind, Alerts
from gateway.errors import NotFound, Unauthorized
from gateway.settings import Integration, Settings
from gateway.store import Store


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status, media_type="application/json")


def _int(value: str | None) -> int | None:
    return int(float(value)) if value else None


class Admin:
    def __init__(self, settings: Settings, store: Store, alerts: Alerts) -> None:
        self._config = settings.config
        self._token = settings.admin_token.get_secret_value().encode() if settings.admin_token else None
        self._store = store
        self._alerts = alerts

    def routes(self) -> list[Route]:
        return [
            Route("/admin/integrations", self.list_integrations, methods=["GET"]),
            Route("/admin/integrations/{name}", self.get_integration, methods=["GET"]),
            Route("/admin/integrations/{name}/pause", self.pause, methods=["POST"]),
            Route("/admin/integrations/{name}/resume", self.resume, methods=["POST"]),
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

    async def describe(self, integration: Integration) -> dict[str, Any]:
        health = await self._store.health(integration.name)
        paused = health.get("state") == "paused"
        return {
            "name": integration.name,
            "mode": integration.mode,
            "target": str(integration.target),
            "state": "paused" if paused else "active",
            "paused_by": ("operator" if health.get("manual") == "1" else "failures") if paused else None,
            "consecutive_failures": int(health.get("fails", 0)),
            "failure_threshold": integration.failure_threshold,
            "held": health["held"],
            "last_error": health.get("last_error"),
            "last_failure_ms": _int(health.get("last_failure_ms")),
            "last_success_ms": _int(health.get("last_success_ms")),
            "paused_ms": _int(health.get("paused_ms")) if paused else None,
            "next_probe_ms": _int(health.get("probe_ms"))
            if paused and integration.probe and health.get("manual") != "1"
            else None,
        }

    async def list_integrations(self, request: Request) -> Response:
        self._authorize(request)
        items = [await self.describe(i) for i in self._config.integrations]
        return json_response({"items": items})

    async def get_integration(self, request: Request) -> Response:
        return json_response(await self.describe(self._integration(request)))

    async def pause(self, request: Request) -> Response:
        integration = self._integration(request)
        before, held = await self._store.set_state(integration.name, "pause", manual=True)
        info = await self.describe(integration)
        if before != "paused":
            await self._alerts.send(
                AlertKind.PAUSED,
                integration.name,
                consecutive_failures=info["consecutive_failures"],
                last_error=info["last_error"] or "",
                held=held,
                reason="by an operator",
            )
        return json_response(info)

    async def resume(self, request: Request) -> Response:
        integration = self._integration(request)
        before, held = await self._store.set_state(integration.name, "resume", manual=True)
        if before == "paused":
            await self._alerts.send(
                AlertKind.RESUMED,
                integration.name,
                consecutive_failures=0,
                held=held,
                reason="by an operator",
            )
        return json_response(await self.describe(integration))
