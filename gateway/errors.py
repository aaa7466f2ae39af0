"""The gateway's exceptions.

GatewayError
 ├── ConfigError            a config file or the environment is wrong; the process refuses to start
 ├── StoreUnavailable       Redis did not answer in time; ingress answers 503
 ├── BlockedTarget          the SSRF guard refused a target's address; the attempt is dead
 ├── ImportRefused          `gateway import`: a bad document, the helpdesk's refusal, a clash;
 │                          nothing was written (or what was is named, with how to undo it)
 └── HTTPError              turned into a JSON error answer (see `gateway.app`)
      ├── InternalError     500, a bug: logged with its traceback, never shown to the client
      ├── BadRequest        400, e.g. a path after /hooks/{name} with dot segments
      ├── InvalidParameter  422, a query parameter the admin API cannot use
      ├── Conflict          409, e.g. replaying an event that is not delivered or dead
      ├── NotFound          404, e.g. an unknown integration
      ├── Unauthorized      401, a missing or wrong inbound token
      ├── Forbidden         403, a dashboard form sent without a session or with a wrong CSRF token
      ├── MethodNotAllowed  405, CONNECT and TRACE at /hooks
      ├── PayloadTooLarge   413, a body over `max_body_bytes`
      ├── ClientClosed      499 (never sent), the helpdesk hung up before its request was whole
      ├── ServiceUnavailable 503, Redis unreachable
      │    └── IntegrationPaused 503, proxy mode: paused, and no copy to answer with
      ├── BadGateway        502, proxy mode: the upstream failed and no copy could answer
      └── GatewayTimeout    504, proxy mode: the upstream did not answer in time, and no copy
"""

from __future__ import annotations

import orjson


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """A config file or the environment is invalid: names the file, the field and the reason."""

    def __init__(self, source: str, field: str, reason: str) -> None:
        self.source = source
        self.field = field
        self.reason = reason
        where = f"{source}: {field}" if field else source
        super().__init__(f"{where}: {reason}")


class StoreUnavailable(GatewayError):
    """Redis could not be reached, or did not answer within the store's deadline."""


class BlockedTarget(GatewayError):
    """The target resolves only to addresses outside what the SSRF guard allows."""


class ImportRefused(GatewayError):
    """`gateway import` stops: the message is one sentence for the operator, shown as is."""


def error_json(code: str, detail: str) -> bytes:
    """The body of every error answer, from Starlette's handlers and the raw ingress alike."""
    return orjson.dumps({"error": code, "detail": detail})


class HTTPError(GatewayError):
    status_code = 500
    code = "internal_error"

    def __init__(self, detail: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        self.detail = detail
        self.headers = headers  # added to the answer (proxy mode: x-gateway-cache, -event-id)
        super().__init__(detail)

    @property
    def body(self) -> bytes:
        return error_json(self.code, self.detail)

    @property
    def reason(self) -> str:
        """The `reason` label of gateway_inbound_refused_total: the status, unless said otherwise."""
        return str(self.status_code)


class InternalError(HTTPError):
    status_code = 500
    code = "internal_error"


class BadRequest(HTTPError):
    status_code = 400
    code = "bad_request"


class InvalidParameter(HTTPError):
    status_code = 422
    code = "invalid_parameter"


class Conflict(HTTPError):
    status_code = 409
    code = "conflict"


class NotFound(HTTPError):
    status_code = 404
    code = "not_found"


class Unauthorized(HTTPError):
    status_code = 401
    code = "unauthorized"


class Forbidden(HTTPError):
    status_code = 403
    code = "forbidden"


class MethodNotAllowed(HTTPError):
    status_code = 405
    code = "method_not_allowed"


class ClientClosed(HTTPError):
    """The client hung up: counted apart from a Redis outage (both were 503), answered to no one."""

    status_code = 499
    code = "client_closed"

    @property
    def reason(self) -> str:
        return "client_closed"


class PayloadTooLarge(HTTPError):
    status_code = 413
    code = "payload_too_large"


class ServiceUnavailable(HTTPError):
    status_code = 503
    code = "unavailable"


class IntegrationPaused(ServiceUnavailable):
    code = "paused"


class BadGateway(HTTPError):
    status_code = 502
    code = "bad_gateway"


class GatewayTimeout(HTTPError):
    status_code = 504
    code = "upstream_timeout"
