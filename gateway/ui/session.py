"""The dashboard's session: a signed cookie that holds the session's CSRF token.

Logging in with the admin token sets the cookie (HttpOnly, SameSite=Strict, Secure when the
request came over HTTPS: uvicorn's proxy headers decide, for a gateway behind a reverse proxy).
The cookie is signed (itsdangerous, HMAC-SHA1 under a key derived from the admin token) and
expires after SESSION_MAX_AGE_S; changing the admin token ends every session. Every form that
changes something carries the session's CSRF token, compared in constant time: a POST without a
session, or with another token, changes nothing (SameSite=Strict already keeps other sites' forms
from sending the cookie; the token covers browsers and proxies that do not honour it).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import Response

COOKIE = "gateway_session"
SESSION_MAX_AGE_S = 12 * 3600


@dataclass(frozen=True)
class Session:
    csrf: str

    def checks(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.csrf.encode())


class Sessions:
    def __init__(self, admin_token: str | None) -> None:
        self._token = admin_token.encode() if admin_token else None
        key = hmac.new(self._token or secrets.token_bytes(32), b"gateway-ui-session", hashlib.sha256)
        self._signer = URLSafeTimedSerializer(key.hexdigest(), salt="gateway-ui-session")

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def token_matches(self, given: str) -> bool:
        return self._token is not None and hmac.compare_digest(given.strip().encode(), self._token)

    def of(self, request: Request) -> Session | None:
        cookie = request.cookies.get(COOKIE)
        if not cookie or self._token is None:
            return None
        try:
            data = self._signer.loads(cookie, max_age=SESSION_MAX_AGE_S)
        except BadSignature:  # includes an expired one
            return None
        if not isinstance(data, dict) or not isinstance(data.get("csrf"), str):
            return None
        return Session(csrf=data["csrf"])

    def start(self, request: Request, response: Response) -> None:
        value = self._signer.dumps({"csrf": secrets.token_urlsafe(32)})
        response.set_cookie(
            COOKIE,
            value,
            max_age=SESSION_MAX_AGE_S,
            path=_cookie_path(request),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    def end(self, request: Request, response: Response) -> None:
        response.delete_cookie(
            COOKIE,
            path=_cookie_path(request),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )


def _cookie_path(request: Request) -> str:
    return request.scope.get("root_path", "") or "/"
