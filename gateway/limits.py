"""What one client may cost the API: header bytes and count, time to send a request, connections.

uvicorn's httptools protocol has no limit on header size (its parser buffers a header until it
ends: a 64 MiB header was read whole, then stored) and no deadline for a request's head or body
(idle keep-alive connections are its only timeout), so a few slow or huge requests could hold the
process's file descriptors and CPU. `limited_protocol` subclasses it with:

- `[gateway] max_header_bytes` (request line and headers) and `max_header_count`: over either, the
  request is answered 431 JSON and the connection closed, before the app sees it;
- `[gateway] read_timeout_s`: a request must arrive whole (head and body) within it, counted from
  its first byte (from the connection's opening for the first request); a late one is answered
  408 JSON (or cut, if the app already answers) and the connection closed;
- `[gateway] max_connections`: past it, the connection that has waited longest without a whole
  request head is closed to make room (a slow client loses its place, not the helpdesk).

At start the process also raises its soft limit of open files to the hard limit (`raise_nofile`).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import error_json

log = logging.getLogger("gateway.limits")
END_OF_HEAD = b"\r\n\r\n"
RESERVED_FILES = 128  # files kept for Redis connections, logs and the rest when sizing the cap


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int
    max_header_count: int
    read_timeout_s: float
    max_connections: int


def raise_nofile() -> int:
    """Raises the soft limit of open files to the hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d: %s", soft, exc)
    return soft


def connection_cap(limits: Limits, open_files: int) -> int:
    """The connections to keep at most: the configured cap, within the process's open-files limit."""
    return max(1, min(limits.max_connections, open_files - RESERVED_FILES))


def _answer(status: int, reason: bytes, code: str, detail: str) -> bytes:
    body = error_json(code, detail)
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n" % (status, reason, len(body))
    ) + body


def limited_protocol(
    limits: Limits, cap: int, on_refused: Callable[[str], None] = lambda reason: None
) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with the limits above (pass it as uvicorn's `http`)."""
    too_large = _answer(
        431,
        b"Request Header Fields Too Large",
        "header_fields_too_large",
        f"the request line and headers may hold at most {limits.max_header_bytes} bytes "
        f"in at most {limits.max_header_count} fields",
    )
    full = _answer(
        503, b"Service Unavailable", "too_many_connections", "the gateway has as many connections as it takes"
    )
    too_slow = _answer(
        408,
        b"Request Timeout",
        "request_timeout",
        f"the request did not arrive whole within {limits.read_timeout_s:g} s",
    )

    # Connections with no request in the app (a head still coming, or keep-alive between two
    # requests), longest waiting first: the ones to close when the cap is reached.
    idle: OrderedDict[LimitedHttpToolsProtocol, None] = OrderedDict()

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._in_head = True
            self._head_bytes = 0
            self._head_tail = b""  # the last bytes seen, for an end of head split across reads
            self._deadline: asyncio.TimerHandle | None = None
            self._refused = False  # answered here: whatever else the client sends is ignored

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()
            if len(self.connections) > cap:
                self._make_room()
            idle[self] = None

        def connection_lost(self, exc: Exception | None) -> None:
            idle.pop(self, None)
            self._disarm()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and not self.pipeline:
                idle[self] = None  # waits for its next request: at the end of the line

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(limits.read_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _make_room(self) -> None:
            """Closes the connection that has waited longest for a whole request head (or idled
            longest between requests); when every other one has a request in hand, this one."""
            on_refused("connection_cap")
            if idle:
                oldest, _ = idle.popitem(last=False)
                oldest._close()
            else:
                self._refused = True
                self.transport.write(full)
                self._close()

        def _close(self) -> None:
            self._disarm()
            self.transport.close()

        def _too_slow(self) -> None:
            self._deadline = None
            on_refused("408")
            self._refused = True
            if self._in_head or self.cycle is None or not self.cycle.response_started:
                self.transport.write(too_slow)
            self.transport.close()

        def _refuse_head(self) -> None:
            on_refused("431")
            self._refused = True
            self.transport.write(too_large)
            self._close()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._in_head:
                seen = self._head_tail + data
                end = seen.find(END_OF_HEAD)
                head = self._head_bytes + (
                    len(data) if end < 0 else end + len(END_OF_HEAD) - len(self._head_tail)
                )
                if head > limits.max_header_bytes:
                    self._refuse_head()
                    return
                if end < 0:
                    self._head_bytes = head
                    self._head_tail = seen[-3:]
            super().data_received(data)

        def on_message_begin(self) -> None:
            if self._refused:
                return
            super().on_message_begin()
            if not self._in_head:  # a later request on this connection: its own deadline
                self._in_head = True
                self._head_bytes = 0
                self._head_tail = b""
                self._arm()

        def on_headers_complete(self) -> None:
            if self._refused:
                return
            idle.pop(self, None)  # its request goes to the app: never closed to make room
            self._in_head = False
            self._head_tail = b""
            if len(self.headers) > limits.max_header_count:
                self._refuse_head()
                return
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if self._refused:
                return
            self._disarm()
            super().on_message_complete()

    return LimitedHttpToolsProtocol
