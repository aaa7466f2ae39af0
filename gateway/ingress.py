"""Ingress: the helpdesk's URL. Accept, persist, answer 202 with the event id."""

from __future__ import annotations

import hmac
from urllib.parse import parse_qsl, urlencode

from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import NotFound, PayloadTooLarge, ServiceUnavailable, StoreUnavailable, Unauthorized
from gateway.events import StoredRequest, new_event_id
from gateway.settings import Config, Integration
from gateway.store import IngestBatcher, NewEvent

# Not relayed: hop-by-hop headers (RFC 9110 7.6.1), what the upstream connection sets itself, the
# gateway's own credential, and the Standard Webhooks headers that the gateway sets per attempt.
DROPPED_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "x-gateway-token",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    }
)
TOKEN_HEADER = "x-gateway-token"
TOKEN_PARAM = "token"
MAX_IDEMPOTENCY_KEY = 200


class Ingress:
    def __init__(self, config: Config, batcher: IngestBatcher) -> None:
        self._config = config
        self._batcher = batcher
        self._max_body = config.gateway.max_body_bytes

    async def handle(self, request: Request) -> Response:
        name: str = request.path_params["name"]
        integration = self._config.integration(name)
        if integration is None:
            raise NotFound(f"no integration is named {name!r}")
        query = request.url.query
        if integration.inbound_token is not None:
            query = _check_token(request, integration, query)
        body = await self._read_body(request)
        headers = _kept_headers(request)
        url = integration.upstream_url(request.path_params.get("rest", ""), query)
        idempotency_key = (request.headers.get("idempotency-key") or request.headers.get("webhook-id") or "")[
            :MAX_IDEMPOTENCY_KEY
        ]
        event = NewEvent(
            new_event_id(),
            name,
            idempotency_key,
            StoredRequest(request.method, url, headers, body).pack(),
        )
        try:
            event_id, repeat = await self._batcher.submit(event)
        except StoreUnavailable as exc:
            raise ServiceUnavailable(f"the event was not stored, retry later ({exc})") from None
        return Response(
            b'{"id":"' + event_id.encode() + b'"}',
            202,
            headers={"idempotent-replayed": "true"} if repeat else None,
            media_type="application/json",
        )

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_body:
            raise PayloadTooLarge(f"the body is larger than {self._max_body} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self._max_body:
                raise PayloadTooLarge(f"the body is larger than {self._max_body} bytes")
            chunks.append(chunk)
        return b"".join(chunks)


def _check_token(request: Request, integration: Integration, query: str) -> str:
    """Raises Unauthorized unless the token matches; returns the query without the token in it."""
    assert integration.inbound_token is not None
    expected = integration.inbound_token.get_secret_value().encode()
    given = request.headers.get(TOKEN_HEADER)
    params = parse_qsl(query, keep_blank_values=True)
    if given is None:
        given = next((v for k, v in params if k == TOKEN_PARAM), None)
    if given is None or not hmac.compare_digest(given.encode(), expected):
        raise Unauthorized("a valid X-Gateway-Token header or token parameter is required")
    return urlencode([(k, v) for k, v in params if k != TOKEN_PARAM])


def _kept_headers(request: Request) -> list[tuple[str, str]]:
    listed = request.headers.get("connection")
    dropped = DROPPED_HEADERS
    if listed:
        dropped = dropped | {h.strip().lower() for h in listed.split(",")}
    return [
        (k.decode("latin-1"), v.decode("latin-1"))
        for k, v in request.scope["headers"]
        if k.decode("latin-1").lower() not in dropped
    ]
