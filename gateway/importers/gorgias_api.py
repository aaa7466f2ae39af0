"""The few calls of the Gorgias REST API the importer needs.

`GET /api/integrations?type=http` answers `{"data": [...], "meta": {"next_cursor": ...}}`; every
page is followed. A 429 is waited out for its `Retry-After` (seconds), at most `max_wait_s` each
time and `max_retries` times in a row, so a stuck account ends the command instead of hanging it.
Authentication is HTTP basic: the user's email and an API key (GORGIAS_USERNAME, GORGIAS_API_KEY).
httpx, as in the operator commands: a few sequential calls, where its simplicity wins.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from gateway.errors import ImportRefused

USERNAME_ENV = "GORGIAS_USERNAME"
API_KEY_ENV = "GORGIAS_API_KEY"
PAGE_LIMIT = 100  # the API's largest page
MAX_PAGES = 1000  # a cursor that never ends is the API's bug; do not follow it forever


def account_base(account: str) -> str:
    """`https://ACCOUNT.gorgias.com` as given, without a trailing slash or `/api`."""
    parts = urlsplit(account.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ImportRefused(f"--account {account!r} is not a URL such as https://ACCOUNT.gorgias.com")
    path = parts.path.rstrip("/").removesuffix("/api")
    return f"{parts.scheme}://{parts.netloc}{path}"


class GorgiasAPI:
    """One account's API. Every failure is an `ImportRefused` that says what to check."""

    def __init__(
        self,
        account: str,
        username: str,
        api_key: str,
        *,
        timeout_s: float = 30.0,
        max_wait_s: float = 60.0,
        max_retries: int = 5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base = account_base(account)
        self._client = httpx.Client(auth=(username, api_key), timeout=timeout_s)
        self._max_wait_s = max_wait_s
        self._max_retries = max_retries
        self._sleep = sleep

    @classmethod
    def from_env(cls, account: str, env: Mapping[str, str] | None = None) -> GorgiasAPI:
        env = os.environ if env is None else env
        username, api_key = env.get(USERNAME_ENV), env.get(API_KEY_ENV)
        if not username or not api_key:
            raise ImportRefused(
                f"set {USERNAME_ENV} (the email of a Gorgias user) and {API_KEY_ENV} "
                "(Settings > REST API in Gorgias) to read the account's integrations"
            )
        return cls(account, username, api_key)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> GorgiasAPI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def integrations(self) -> list[Any]:
        """Every HTTP integration of the account, following `meta.next_cursor` to the end."""
        items: list[Any] = []
        cursor: str | None = None
        for _ in range(MAX_PAGES):
            params: dict[str, str | int] = {"type": "http", "limit": PAGE_LIMIT}
            if cursor:
                params["cursor"] = cursor
            page = self._call("GET", "/api/integrations", params=params)
            data = page.get("data") if isinstance(page, dict) else None
            if not isinstance(data, list):
                raise ImportRefused(f"{self.base}/api/integrations did not answer a page of integrations")
            items.extend(data)
            meta = page.get("meta")
            cursor = meta.get("next_cursor") if isinstance(meta, dict) else None
            if not cursor:
                return items
        raise ImportRefused(f"{self.base}/api/integrations gave more than {MAX_PAGES} pages; stopped")

    def update(self, integration_id: int, body: dict[str, Any]) -> Any:
        """`PUT /api/integrations/{id}/`: the fields in `body` replace the integration's."""
        return self._call("PUT", f"/api/integrations/{integration_id}/", json=body)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        url = self.base + path
        for _ in range(self._max_retries + 1):
            try:
                response = self._client.request(method, url, **kwargs)
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise ImportRefused(
                    f"cannot reach {self.base} ({type(exc).__name__}: {exc}); is --account right?"
                ) from None
            if response.status_code != 429:
                break
            self._sleep(self._retry_after(response))
        else:
            raise ImportRefused(f"{self.base} kept answering 429 (too many requests); try again later")
        if response.status_code in (401, 403):
            raise ImportRefused(
                f"{self.base} refused the credentials ({response.status_code}): "
                f"check {USERNAME_ENV} and {API_KEY_ENV}"
            )
        if response.status_code >= 400:
            raise ImportRefused(f"{method} {url} answered {response.status_code}: {response.text[:200]}")
        try:
            return response.json()
        except ValueError:
            raise ImportRefused(
                f"{method} {url} did not answer JSON; is --account a Gorgias account?"
            ) from None

    def _retry_after(self, response: httpx.Response) -> float:
        try:
            wait = float(response.headers.get("retry-after", "1"))
        except ValueError:
            wait = 1.0
        return min(max(wait, 0.0), self._max_wait_s)
