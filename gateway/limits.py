"""What one client may cost the API: header bytes and count, time to send a request, connections.

uvicorn's httptools protocol has no limit on header size (its parser buffers a header until it
ends: a 64 MiB header was read whole, then stored) and no deadline for a request's head or body
(idle keep-alive connections are its only timeout), so a few slow or huge requests could hold the
process's file descriptors and CPU. `limited_protocol` subclasses it with:

- `[gateway] max_header_bytes` (request line and headers) and `max_header_count`: over either, the
  request is answered 431 JSON and the connection closed, before the parser or the app sees it;
- `[gateway] read_timeout_s`: a request must arrive whole (head and body) within it, counted from
  its first byte (from the connection's opening for the first request); a late one is answered
  408 JSON (or cut, if the app already answers) and the connection closed (deadlines are checked
  by a sweep every min(1 s, read_timeout_s / 4), so a late request is cut within that much more);
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
    # Deadlines are checked by one sweep of the open connections every `tick` seconds, not by a
    # timer per request (arming and cancelling one cost a few per cent of the API's CPU): a late
    # request is answered between read_timeout_s and read_timeout_s + tick after it began.
    tick = min(1.0, limits.read_timeout_s / 4)
    sweeping: dict[asyncio.AbstractEventLoop, asyncio.TimerHandle] = {}
    base = HttpToolsProtocol  # its methods are called directly: cheaper than super() per request

    def sweep(loop: asyncio.AbstractEventLoop, connections: set[Any]) -> None:
        if not connections:
            del sweeping[loop]  # started again by the next connection
            return
        late = loop.time() - limits.read_timeout_s
        for connection in list(connections):
            since = getattr(connection, "_since", None)
            if since is not None and since <= late:
                connection._too_slow()
        sweeping[loop] = loop.call_later(tick, sweep, loop, connections)

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._in_head = True  # counting the bytes and lines of a request head
            self._head_bytes = 0
            self._head_lines = 0
            self._head_tail = b""  # the last bytes seen, for an end of head split across reads
            # When the request being received began (loop time), None when none is: from the
            # connection's opening for the first request, from its first byte for later ones.
            self._since: float | None = None
            self._refused = False  # answered here: whatever else the client sends is ignored
            # A request began in the rest of the read that ended the one before (pipelining): the
            # bytes before the next read were not counted, so its head is checked once parsed.
            self._uncounted = False
            self._answer_after = b""  # a refusal's answer, sent after those before it (_refuse)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            base.connection_made(self, transport)
            self._since = self.loop.time()
            if self.loop not in sweeping:
                sweeping[self.loop] = self.loop.call_later(tick, sweep, self.loop, self.connections)
            if len(self.connections) > cap:
                self._make_room()
            idle[self] = None

        def connection_lost(self, exc: Exception | None) -> None:
            idle.pop(self, None)
            self._since = None
            base.connection_lost(self, exc)

        def on_response_complete(self) -> None:
            base.on_response_complete(self)
            if self.transport.is_closing():
                return
            if self._refused:  # a pipelined request was refused: its answer once those before it are out
                if self.cycle is not None and self.cycle.response_complete:
                    self.transport.write(self._answer_after)
                    self.transport.close()
            elif not self.pipeline:
                idle[self] = None  # waits for its next request: at the end of the line

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
            self._since = None
            self.transport.close()

        def _too_slow(self) -> None:
            if self._in_head:
                self._refuse("408", too_slow)
                return
            # Its body is late: answered 408 unless the app already answers it or (pipelining)
            # it waits behind another request's answer; then the connection is only cut.
            self._since = None
            on_refused("408")
            self._refused = True
            if not self.pipeline and not self.cycle.response_started:
                self.transport.write(too_slow)
            self.transport.close()

        def _refuse_head(self) -> None:
            self._refuse("431", too_large)

        def _refuse(self, reason: str, answer: bytes) -> None:
            """Answers a request refused before its head reached the app, and closes: at once, or
            (pipelining) once the requests before it are answered, not in the midst of that."""
            on_refused(reason)
            self._refused = True  # whatever else the client sends is ignored
            self._since = None
            if self.cycle is not None and not self.cycle.response_complete:
                self._answer_after = answer  # by on_response_complete
            else:
                self.transport.write(answer)
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            """Counts the head's bytes and lines before the parser sees them, so a head over the
            limits is refused before it is parsed (the parser buffers a header until it ends)."""
            if self._refused:
                return
            if self._in_head:
                if self._since is None:  # the first byte of a later request: its deadline begins
                    self._uncounted = False  # (and the rest of the read before held none of it)
                    self._since = self.loop.time()
                counted = data
                if not self._head_bytes and data[:1] in b"\r\n":
                    # The parser skips empty lines before a request line: an end of head found
                    # among them is not this head's (b"\r\n\r\n" then a huge head got through).
                    counted = data.lstrip(b"\r\n")
                tail = self._head_tail
                seen = tail + counted if tail else counted
                end = seen.find(END_OF_HEAD)
                if end < 0:
                    head = self._head_bytes + len(counted)
                    lines = self._head_lines + counted.count(b"\n")
                else:
                    head = self._head_bytes + end + len(END_OF_HEAD) - len(tail)
                    lines = self._head_lines + seen.count(b"\n", len(tail), end + len(END_OF_HEAD))
                # The head's lines: the request line, one per field and the empty line.
                if head > limits.max_header_bytes or lines - 2 > limits.max_header_count:
                    self._refuse_head()
                    return
                if end < 0:
                    self._head_bytes, self._head_lines, self._head_tail = head, lines, seen[-3:]
            base.data_received(self, data)

        def on_message_begin(self) -> None:
            base.on_message_begin(self)
            if self._since is None:  # a later request on this connection: its own deadline
                self._since = self.loop.time()

        def on_headers_complete(self) -> None:
            if self._refused:
                return  # a later request in the read that was refused: not for the app
            if self._uncounted:
                self._uncounted = False
                # The request line ("METHOD url HTTP/1.1\r\n"), the fields and the empty line.
                size = len(self.parser.get_method()) + len(self.url) + 14
                size += sum(len(name) + len(value) + 4 for name, value in self.headers)
                if size > limits.max_header_bytes or len(self.headers) > limits.max_header_count:
                    self._refuse_head()
                    return
            idle.pop(self, None)  # its request goes to the app: never closed to make room
            self._in_head = False
            base.on_headers_complete(self)

        def on_body(self, body: bytes) -> None:
            if not self._refused:  # a refused pipelined request's body is not the one before it's
                base.on_body(self, body)

        def on_message_complete(self) -> None:
            # Received whole: no deadline, and what comes next is the next request's head, counted
            # from its next read; a head begun in the rest of this read (only pipelining sends one)
            # is parsed uncounted, bounded by the read's size, and checked in on_headers_complete.
            self._since = None
            self._in_head = True
            self._uncounted = True
            self._head_bytes = self._head_lines = 0
            self._head_tail = b""
            base.on_message_complete(self)

    return LimitedHttpToolsProtocol
