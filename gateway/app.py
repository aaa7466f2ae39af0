"""The API process: ingress, health, and the one place where errors become JSON answers."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.errors import HTTPError
from gateway.health import Health
from gateway.ingress import Ingress
from gateway.settings import Settings
from gateway.store import IngestBatcher, Store, redis_client

log = logging.getLogger("gateway.api")
ANY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def json_error(status: int, code: str, detail: str) -> Response:
    return Response(orjson.dumps({"error": code, "detail": detail}), status, media_type="application/json")


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPError)
    return json_error(exc.status_code, exc.code, exc.detail)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return json_error(exc.status_code, code, str(exc.detail))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return json_error(500, "internal_error", "the gateway failed to handle this request; see its log")


def create_app(settings: Settings) -> Starlette:
    config = settings.config
    redis = redis_client(settings.redis_url, timeout_s=config.gateway.store_timeout_s)
    store = Store(redis, settings.key_prefix)
    batcher = IngestBatcher(store, config.gateway.idempotency_ttl_s, config.gateway.store_timeout_s)
    ingress = Ingress(config, batcher)
    health = Health(store, config.gateway.store_timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        log.info("API ready with %d integrations", len(config.integrations))
        try:
            yield {"store": store}
        finally:
            await redis.aclose()

    routes = [
        Route("/hooks/{name}", ingress.handle, methods=ANY_METHOD),
        Route("/hooks/{name}/{rest:path}", ingress.handle, methods=ANY_METHOD),
        Route("/healthz", health.live, methods=["GET", "HEAD"]),
        Route("/readyz", health.ready, methods=["GET", "HEAD"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            HTTPError: _gateway_error,
            HTTPException: _http_exception,
            Exception: _unexpected,
        },
    )
