"""Ingress: the helpdesk's URL. Relay mode: accept, persist, answer 202 with the event id; proxy
mode: hand the request to `gateway.proxy` and answer what it says.

This is the hottest path of the gateway, so it is a plain ASGI app mounted at /hooks: one pass
over the raw headers, no Request or Response objects (measured: Starlette's request/response
machinery cost more per request than everything the gateway itself does). Its errors are answered
with the same JSON bodies as the rest of the API (`gateway.errors.error_json`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Callable
from urllib.parse import unquote, unquote_plus

from starlette.types import Message, Receive, Scope, Send

from gateway.errors import (
    BadRequest,
    ClientClosed,
    HTTPError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    StoreUnavailable,
    Unauthorized,
)
from gateway.events import StoredRequest, new_event_id
from gateway.proxy import Proxy
from gateway.sealing import AtRest
from gateway.settings import Config, Integration
from gateway.signing import BadSignature
from gateway.store import IngestBatcher, NewEvent

# Not relayed: hop-by-hop headers (RFC 9110 7.6.1), what the upstream connection sets itself, the
# gateway's own credential, and the Standard Webhooks headers that the gateway sets per attempt.
DROPPED_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"x-gateway-token",
        b"webhook-id",
        b"webhook-timestamp",
        b"webhook-signature",
    }
)
log = logging.getLogger("gateway.ingress")
PREFIX = b"/hooks/"
REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})
ALLOW = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
MAX_IDEMPOTENCY_KEY = 200  # longer keys are kept as their SHA-256: compared whole, stored short
# With a content-length, uvicorn sends the body as it is; without, chunked (more bytes to write and
# for the helpdesk to parse).
JSON_HEADERS = [(b"content-type", b"application/json")]


class Answered(Exception):
    """Ends a request that gets an answer of its own and no event (OPTIONS, unless forwarded)."""

    def __init__(self, status: int) -> None:
        self.status = status


class Ingress:
    """ASGI app for `ANY /hooks/{name}[/{rest}]`."""

    def __init__(
        self,
        config: Config,
        batcher: IngestBatcher,
        proxy: Proxy,
        on_refused: Callable[[str], None],
        at_rest: AtRest,
    ) -> None:
        self._config = config
        self._batcher = batcher
        self._proxy = proxy
        self._on_refused = on_refused
        self._at_rest = at_rest
        self._max_body = config.gateway.max_body_bytes
        # A helpdesk header that a configured one replaces is neither sent nor stored.
        self._dropped = {
            i.name: DROPPED_HEADERS | {n.encode("latin-1") for n in i.configured_header_names}
            for i in config.integrations
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            integration, request, idempotency_key = await self._receive(scope, receive)
            if integration.mode == "proxy":
                answer, log_item = await self._proxy.answer(integration, request)
                length = len(answer.body) if answer.length is None else answer.length
                await _answer(send, answer.status, answer.body, answer.headers, length)
                if log_item is not None:
                    self._proxy.log_later(log_item)
                return
            event_id, repeat = await self._accept(integration, request, idempotency_key)
        except Answered as done:  # e.g. a browser's CORS preflight: answered, stored nowhere
            await _answer(send, done.status, b"", [(b"allow", ALLOW)])
            return
        except HTTPError as exc:
            self._on_refused(exc.reason)
            await _answer(send, exc.status_code, exc.body, [*JSON_HEADERS, *exc.headers])
            return
        except Exception:
            log.exception("unexpected error on %s %s", scope["method"], scope["path"])
            await _answer(send, 500, InternalError("the gateway failed; see its log").body)
            return
        body = b'{"id":"' + event_id.encode() + b'"}'
        headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
        if repeat:
            headers.append((b"idempotent-replayed", b"true"))
        await send({"type": "http.response.start", "status": 202, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _receive(self, scope: Scope, receive: Receive) -> tuple[Integration, StoredRequest, str]:
        """The helpdesk's request as it goes upstream, once every check has passed, and its
        idempotency key ("" when none was sent)."""
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        name_b, _, rest_b = raw_path[len(PREFIX) :].partition(b"/")
        name = unquote(name_b.decode("latin-1"))
        integration = self._config.integration(name)
        if integration is None:
            raise NotFound(f"no integration is named {name!r}")
        method = scope["method"]
        if method in REFUSED_METHODS:
            raise MethodNotAllowed(f"{method} is not relayed", ((b"allow", ALLOW),))
        if method == "OPTIONS" and not integration.forward_options:
            raise Answered(204)

        kept: list[tuple[str, str]] = []
        dropped = base = self._dropped.get(integration.name, DROPPED_HEADERS)
        declared = token = idempotency_key = None
        for key, value in scope["headers"]:
            if key == b"content-length":
                declared = value
            elif key == b"x-gateway-token":
                token = value.decode("latin-1")
            elif key == b"idempotency-key" or (key == b"webhook-id" and idempotency_key is None):
                idempotency_key = value.decode("latin-1")
            elif key == b"connection":
                dropped = dropped | {h.strip().lower().encode() for h in value.decode("latin-1").split(",")}
            if key not in dropped:
                # As text that aiohttp (which writes UTF-8) sends back byte for byte: UTF-8 when it
                # is (ASCII is), else Latin-1, whose bytes above 0x7f then go out re-encoded.
                try:
                    text = value.decode()
                except UnicodeDecodeError:
                    text = value.decode("latin-1")
                kept.append((key.decode("latin-1"), text))
        if dropped is not base:
            kept = [(k, v) for k, v in kept if k.encode("latin-1") not in dropped]

        query = scope["query_string"].decode("latin-1")
        if integration.inbound_token is not None:
            query = _check_token(integration, token, query)
        if declared is not None and declared.isdigit() and int(declared) > self._max_body:
            raise PayloadTooLarge(f"the body is larger than {self._max_body} bytes")
        body = await self._read_body(receive)
        if integration.inbound_signature is not None:
            _check_signature(integration, scope["headers"], body)

        rest = rest_b.decode("latin-1")
        _refuse_dot_segments(rest)
        url = integration.upstream_url(rest, query)
        return integration, StoredRequest(scope["method"], url, kept, body), idempotency_key or ""

    async def _accept(
        self, integration: Integration, request: StoredRequest, idempotency_key: str
    ) -> tuple[str, bool]:
        event = NewEvent(
            new_event_id(), integration.name, _idempotency_key(idempotency_key), self._at_rest.pack(request)
        )
        try:
            return await self._batcher.submit(event)
        except StoreUnavailable as exc:
            raise ServiceUnavailable(f"the event was not stored, retry later ({exc})") from None

    async def _read_body(self, receive: Receive) -> bytes:
        message: Message = await receive()
        body: bytes = message.get("body", b"")
        if not message.get("more_body", False):
            if len(body) > self._max_body:
                raise PayloadTooLarge(f"the body is larger than {self._max_body} bytes")
            return body
        chunks = [body]
        size = len(body)
        while message.get("more_body", False):
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientClosed("the client went away before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                raise PayloadTooLarge(f"the body is larger than {self._max_body} bytes")
            chunks.append(chunk)
        return b"".join(chunks)


def _refuse_dot_segments(rest: str) -> None:
    """The path after /hooks/{name} may not climb: a `.` or `..` segment, written plainly or
    percent-encoded (%2e, %2f), would be resolved by the URL library or the endpoint and reach
    another path of the target's host with the integration's credentials. A helpdesk templates
    customer data into this path, so it is refused, not resolved."""
    if "." not in rest and "%" not in rest:
        return  # the usual path: nothing to decode
    for segment in re.split(r"[/\\]", unquote(rest)):
        if segment in (".", ".."):
            raise BadRequest("the path after /hooks/{name} may not contain . or .. segments")


def _check_signature(integration: Integration, raw: list[tuple[bytes, bytes]], body: bytes) -> None:
    """Raises Unauthorized unless the request carries the signature its integration asks for."""
    assert integration.inbound_signature is not None
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw}
    try:
        integration.inbound_signature.verify(headers, body)
    except BadSignature as exc:
        raise Unauthorized(f"the request's signature was refused: {exc}") from None


def _check_token(integration: Integration, given: str | None, query: str) -> str:
    """Raises Unauthorized unless the token matches; returns the query without the token in it."""
    assert integration.inbound_token is not None
    expected = integration.inbound_token.get_secret_value().encode()
    # The query goes on byte for byte, less the token: it is cut out, never decoded and re-encoded
    # (which changed `;`, `%FF` and bare flags).
    param = integration.inbound_token_param
    kept, tokens = [], []
    for part in query.split("&") if param else ():
        name, _, value = part.partition("=")
        if unquote_plus(name) == param:
            tokens.append(unquote_plus(value))
        else:
            kept.append(part)
    if given is None and tokens:
        given = tokens[0]
    if given is None or not hmac.compare_digest(given.encode(), expected):
        where = f" or {param} parameter" if param else " (the token parameter is off)"
        raise Unauthorized(f"a valid X-Gateway-Token header{where} is required")
    return "&".join(kept) if tokens else query


async def _answer(
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] = JSON_HEADERS,
    length: int | None = None,
) -> None:
    headers = [*headers, (b"content-length", str(len(body) if length is None else length).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _idempotency_key(key: str) -> str:
    """The key as stored: itself, or when longer than MAX_IDEMPOTENCY_KEY its SHA-256 (two long
    keys that differ anywhere are two events; cutting them short made them one)."""
    if len(key) <= MAX_IDEMPOTENCY_KEY:
        return key
    return "sha256:" + hashlib.sha256(key.encode("latin-1")).hexdigest()
