"""A stand-in for the Gorgias REST API, written from its documented shapes (it cannot run here).

A real HTTP server on a loopback port (aiohttp in a thread, as tests/upstream.py):
- HTTP basic auth with a user's email and an API key; anything else is answered 401.
- `GET /api/integrations?type=http&limit=N&cursor=C`: `{"data": [...], "meta": {"next_cursor": ...,
  "prev_cursor": ...}}`, at most `page_size` items a page, the cursor an opaque string.
- `throttle`: answers that many requests with 429 and `Retry-After` first, as the API does past its
  rate limit.
- `PUT /api/integrations/{id}/`: the given fields replace the integration's; the updated object is
  the answer. `fail_put` ids answer 500.
"""

from __future__ import annotations

import base64
import copy
import threading
from typing import Any

import orjson
from aiohttp import web

from benchmarks._common import ServedInThread

USERNAME = "ops@example.com"
API_KEY = "gorgias-api-key-for-tests"


class FakeGorgias(ServedInThread):
    def __init__(self, integrations: list[dict[str, Any]], *, page_size: int = 2) -> None:
        super().__init__()
        self.integrations: dict[int, dict[str, Any]] = {i["id"]: copy.deepcopy(i) for i in integrations}
        self.page_size = page_size
        self.throttle = 0  # requests answered 429 before any other
        self.retry_after = "0"
        self.fail_put: set[int] = set()
        self.requests: list[tuple[str, str]] = []  # (method, path with query), in order
        self.puts: list[tuple[int, dict[str, Any]]] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, integration_id: int) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self.integrations[integration_id])

    def _authorized(self, request: web.Request) -> bool:
        expected = "Basic " + base64.b64encode(f"{USERNAME}:{API_KEY}".encode()).decode()
        return request.headers.get("Authorization") == expected

    def _gate(self, request: web.Request) -> web.Response | None:
        with self._lock:
            self.requests.append((request.method, request.path_qs))
            if self.throttle:
                self.throttle -= 1
                return _json({"error": {"msg": "Too many requests"}}, 429, {"Retry-After": self.retry_after})
        if not self._authorized(request):
            return _json({"error": {"msg": "Unauthorized"}}, 401)
        return None

    async def _list(self, request: web.Request) -> web.Response:
        refused = self._gate(request)
        if refused is not None:
            return refused
        kind = request.query.get("type")
        limit = min(int(request.query.get("limit", "30")), self.page_size)
        start = int(base64.urlsafe_b64decode(request.query["cursor"])) if "cursor" in request.query else 0
        with self._lock:
            items = [i for i in self.integrations.values() if kind is None or i.get("type") == kind]
            page = copy.deepcopy(items[start : start + limit])
        more = start + limit < len(items)
        next_cursor = base64.urlsafe_b64encode(str(start + limit).encode()).decode() if more else None
        return _json({"data": page, "meta": {"next_cursor": next_cursor, "prev_cursor": None}}, 200)

    async def _put(self, request: web.Request) -> web.Response:
        refused = self._gate(request)
        if refused is not None:
            return refused
        integration_id = int(request.match_info["id"])
        body = orjson.loads(await request.read())
        with self._lock:
            if integration_id not in self.integrations:
                return _json({"error": {"msg": "Not found"}}, 404)
            if integration_id in self.fail_put:
                return _json({"error": {"msg": "Internal error"}}, 500)
            self.puts.append((integration_id, body))
            self.integrations[integration_id].update(copy.deepcopy(body))
            answer = copy.deepcopy(self.integrations[integration_id])
        return _json(answer, 200)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/integrations", self._list)
        app.router.add_put("/api/integrations/{id}/", self._put)
        return app


def _json(data: Any, status: int, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(data), content_type="application/json", headers=headers
    )
