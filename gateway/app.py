"""The API process: ingress, health, and the one place where errors become JSON answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import uvicorn
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway.admin import Admin, Operations
from gateway.alerts import Alerts
from gateway.errors import HTTPError, error_json
from gateway.health import Readiness
from gateway.ingress import Ingress
from gateway.limits import Limits, connection_cap, limited_protocol, raise_nofile
from gateway.metrics import Metrics, Refusals
from gateway.openapi import openapi_endpoint
from gateway.proxy import Proxy
from gateway.sealing import AtRest
from gateway.settings import Settings
from gateway.store import IngestBatcher, Store, redis_client
from gateway.ui import Dashboard

log = logging.getLogger("gateway.api")


def json_error(status: int, code: str, detail: str) -> Response:
    return Response(error_json(code, detail), status, media_type="application/json")


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPError)
    return json_error(exc.status_code, exc.code, exc.detail)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return json_error(exc.status_code, code, str(exc.detail))


async def _store_unavailable(request: Request, exc: Exception) -> Response:
    return json_error(503, "unavailable", f"Redis is not reachable: {type(exc).__name__}")


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return json_error(500, "internal_error", "the gateway failed to handle this request; see its log")


class GatewayApp:
    """The ASGI app of `gateway serve`: webhooks go straight to Ingress, everything else to Starlette.

    Measured here, Starlette's middleware stack and router cost a helpdesk request more CPU than
    the gateway's own work on it, so the hot path skips them; Ingress answers its own errors with
    the same JSON bodies as Starlette's exception handlers below.
    """

    def __init__(self, ingress: Ingress, api: Starlette, refused: Callable[[str], None]) -> None:
        self.ingress = ingress
        self.api = api
        self.refused = refused  # counts a refusal made below the app (gateway.limits)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/hooks/"):
            await self.ingress(scope, receive, send)
        else:
            await self.api(scope, receive, send)


def create_app(settings: Settings) -> GatewayApp:
    config = settings.config
    redis = redis_client(settings.redis_url, timeout_s=config.gateway.store_timeout_s)
    store = Store(redis, settings.key_prefix)
    batcher = IngestBatcher(store, config.gateway.idempotency_ttl_s, config.gateway.store_timeout_s)
    refusals = Refusals(store)
    alerts = Alerts(config, settings.public_url, store)
    # "plain" stores credentials in clear even when GATEWAY_SECRET_KEY is set (the workers still
    # open what was sealed before).
    sealer = settings.sealer if config.gateway.store_credentials == "sealed" else None
    at_rest = AtRest(sealer, config.gateway.credential_names)
    proxy = Proxy(config, store, alerts, at_rest)
    ingress = Ingress(config, batcher, proxy, refusals.add, at_rest)
    health = Readiness(store, config.gateway.store_timeout_s)
    metrics = Metrics(config, store)
    operations = Operations(settings, store, alerts, proxy.forget_pause)
    admin = Admin(settings, operations)
    token = settings.admin_token.get_secret_value() if settings.admin_token else None
    dashboard = Dashboard(operations, token)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        log.info("API ready with %d integrations", len(config.integrations))
        for warning in await store.durability():
            log.warning("%s", warning)
        flusher = asyncio.create_task(refusals.flush_forever())
        await proxy.start()
        try:
            yield
        finally:
            flusher.cancel()
            await proxy.close()
            await redis.aclose()

    routes = [
        Route("/healthz", health.live, methods=["GET", "HEAD"]),
        Route("/readyz", health.ready, methods=["GET", "HEAD"]),
        Route("/admin/openapi.json", openapi_endpoint, methods=["GET"]),
        Route("/metrics", metrics.endpoint, methods=["GET"]),
        *admin.routes(),
        dashboard.mount(),
    ]
    api = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            HTTPError: _gateway_error,
            HTTPException: _http_exception,
            RedisError: _store_unavailable,
            TimeoutError: _store_unavailable,
            Exception: _unexpected,
        },
    )
    return GatewayApp(ingress, api, refusals.add)


def serve_config(app: GatewayApp, settings: Settings, **options: Any) -> uvicorn.Config:
    """uvicorn's config for the API: httptools with the gateway's limits on what a client may
    send, and the open-files limit raised to the hard limit."""
    section = settings.config.gateway
    limits = Limits(
        section.max_header_bytes, section.max_header_count, section.read_timeout_s, section.max_connections
    )
    cap = connection_cap(limits, raise_nofile())
    return uvicorn.Config(
        app,
        http=limited_protocol(limits, cap, app.refused),
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=max(1, math.ceil(section.shutdown_grace_s)),
        **options,
    )
