"""The operator dashboard under /ui: server-rendered pages on the admin API's operations.

Pages are Jinja2 templates rendered from the same shapes as the JSON API (`admin.Operations`), so
both show the same figures with the same redaction. The only JavaScript is htmx, shipped in the
package (`static/`), which refreshes the overview, an event being delivered and a bulk replay by
polling; every page works without it (a reload shows the same). Every action is a GET that shows
what it will do and a POST form (with the session's CSRF token) that does it, then a redirect to a
page that says what happened.
"""

from __future__ import annotations

import math
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlencode

from markupsafe import Markup
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import shapes
from gateway.admin import Operations
from gateway.errors import Forbidden, HTTPError, InvalidParameter
from gateway.events import TERMINAL, EventState, now_ms
from gateway.ui.session import Session, Sessions

HERE = Path(__file__).parent
REFRESH_S = 5  # how often the overview refreshes itself
LIVE_REFRESH_S = 1  # an event being delivered, a bulk replay running
MAX_FORM_BYTES = 16 * 1024

# What the page says after an action (the redirect names the outcome; the words are ours).
NOTICES = {
    "paused": "{name} is paused: nothing is sent to it, new events are held.",
    "resumed": "{name} is resumed: held events are sent again, in arrival order.",
    "replayed": "Replay requested: the event is scheduled again, with the same webhook-id.",
    "cancelled": "The bulk replay is cancelled: the events not yet replayed stay as they are.",
    "started": "The bulk replay has started.",
}


class SecurityHeaders:
    """The dashboard's pages load nothing from elsewhere and run no inline script; nor may another
    site frame them, and nothing is cached."""

    HEADERS: ClassVar[list[tuple[bytes, bytes]]] = [
        (
            b"content-security-policy",
            b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
            b"frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"same-origin"),
        (b"x-content-type-options", b"nosniff"),
        (b"cache-control", b"no-store"),
    ]

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in self.HEADERS if k not in names]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, with_headers)


def when(ms: int | None) -> str:
    if ms is None:
        return "never"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(ms: int | None) -> str:
    if ms is None:
        return "never"
    seconds = max(0, (now_ms() - ms) // 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def latency(ms: float | None) -> str:
    if ms is None:
        return "none yet"
    if math.isinf(ms):
        return "> 30 s"
    return f"≤ {ms / 1000:g} s" if ms >= 1000 else f"≤ {ms:g} ms"


def sparkline(activity: shapes.Activity, width: int = 240, height: int = 40) -> Markup:
    """Delivered (below) and failed (stacked above) attempts per minute, one bar a minute."""
    minutes = len(activity.delivered)
    top = max([d + f for d, f in zip(activity.delivered, activity.failed, strict=True)] + [1])
    step = width / max(minutes, 1)
    bars = []
    for i, (d, f) in enumerate(zip(activity.delivered, activity.failed, strict=True)):
        x = f"{i * step:.1f}"
        w = f"{max(step - 1, 1):.1f}"
        hd, hf = d / top * height, f / top * height
        if d:
            bars.append(f'<rect class="ok" x="{x}" y="{height - hd:.1f}" width="{w}" height="{hd:.1f}"/>')
        if f:
            y = height - hd - hf
            bars.append(f'<rect class="bad" x="{x}" y="{y:.1f}" width="{w}" height="{hf:.1f}"/>')
    total_d, total_f = sum(activity.delivered), sum(activity.failed)
    label = f"last hour, per minute: {total_d} attempts delivered, {total_f} failed"
    if total_d + total_f:
        label += f" (most in one minute: {top})"
    return Markup(
        f'<svg class="spark" viewBox="0 0 {width} {height}" preserveAspectRatio="none" '
        f'role="img" aria-label="{label}"><title>{label}</title>'
        f'<line class="axis" x1="0" y1="{height - 0.5}" x2="{width}" y2="{height - 0.5}"/>'
        + "".join(bars)
        + "</svg>"
    )


def state_word(integration: shapes.Integration) -> tuple[str, str]:
    """(css class, words) of an integration's state: the words say it, the colour repeats it."""
    if integration.state == "paused":
        if integration.paused_by == "operator":
            return "paused", "paused by hand"
        return "failing", "paused by failures"
    if integration.draining:
        return "draining", "draining held events"
    return "active", "active"


class Dashboard:
    """The /ui app: a Starlette app of its own (mounted by `gateway.app`), whose errors are pages."""

    def __init__(self, operations: Operations, admin_token: str | None) -> None:
        self.ops = operations
        self.sessions = Sessions(admin_token)
        self.templates = Jinja2Templates(directory=HERE / "templates")
        env = self.templates.env
        env.filters.update(when=when, ago=ago, latency=latency)
        env.globals.update(sparkline=sparkline, state_word=state_word, states=list(EventState))

    def mount(self) -> Mount:
        return Mount("/ui", app=self.app())

    def app(self) -> Starlette:
        routes = [
            Route("/", self.overview, methods=["GET"]),
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/events", self.events, methods=["GET"]),
            Route("/events/{id}", self.event, methods=["GET"]),
            Route("/events/{id}/replay", self.confirm_replay_event, methods=["GET"]),
            Route("/events/{id}/replay", self.replay_event, methods=["POST"]),
            Route("/integrations/{name}/{action:str}", self.confirm_state, methods=["GET"]),
            Route("/integrations/{name}/{action:str}", self.set_state, methods=["POST"]),
            Route("/replay", self.confirm_bulk_replay, methods=["GET"]),
            Route("/replay", self.bulk_replay, methods=["POST"]),
            Route("/replays/{id}", self.replay_job, methods=["GET"]),
            Route("/replays/{id}/cancel", self.confirm_cancel, methods=["GET"]),
            Route("/replays/{id}/cancel", self.cancel, methods=["POST"]),
            Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
        ]
        return Starlette(
            routes=routes,
            middleware=[Middleware(SecurityHeaders)],
            exception_handlers={
                HTTPError: self._error,
                HTTPException: self._error,
                RedisError: self._error,
                TimeoutError: self._error,
            },
        )

    # Rendering ---------------------------------------------------------------------------------

    def _page(
        self, request: Request, template: str, code: int = 200, session: Session | None = None, **ctx: Any
    ) -> Response:
        notice = NOTICES.get(request.query_params.get("done", ""), "")
        name = request.query_params.get("name", "")
        if "{name}" in notice and name not in self.ops.names:
            notice = ""  # the words are ours: a link cannot make the page say something else
        context = {
            "base": request.scope.get("root_path", ""),
            "session": session,
            "notice": notice.format(name=name),
            "now_ms": now_ms(),
            **ctx,
        }
        return self.templates.TemplateResponse(request, template, context, status_code=code)

    async def _error(self, request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPError):
            status, detail = exc.status_code, exc.detail
        elif isinstance(exc, HTTPException):
            status, detail = exc.status_code, str(exc.detail)
            if status == 404:
                detail = "There is no such page in the dashboard."
        else:  # Redis or its deadline
            status, detail = 503, f"Redis is not reachable ({type(exc).__name__}): try again shortly."
        return self._page(
            request, "error.html", status, self.sessions.of(request), status=status, detail=detail
        )

    def _redirect(self, request: Request, path: str, **query: str) -> Response:
        url = request.scope.get("root_path", "") + path + (("?" + urlencode(query)) if query else "")
        return RedirectResponse(url, 303)

    def _session(self, request: Request) -> Session | Response:
        """The session, or the answer that sends the browser to the login form."""
        session = self.sessions.of(request)
        if session is not None:
            return session
        if request.headers.get("hx-request") == "true":  # a refresh after the session ended
            return Response(status_code=204, headers={"hx-redirect": request.scope["root_path"] + "/login"})
        return self._redirect(request, "/login")

    async def _form(self, request: Request) -> tuple[Session, dict[str, str]]:
        """A POSTed form with the session's CSRF token, or Forbidden: without a valid session and
        its token, nothing changes."""
        session = self.sessions.of(request)
        if session is None:
            raise Forbidden("Your session has ended (or you are not logged in): log in, then try again.")
        form = await _read_form(request)
        if not session.checks(form.get("csrf", "")):
            raise Forbidden(
                "The form's security token does not match your session: reload the page and try again."
            )
        return session, form

    # Login -------------------------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        return self._page(request, "login.html", enabled=self.sessions.enabled)

    async def login(self, request: Request) -> Response:
        token = (await _read_form(request)).get("token", "")
        if not self.sessions.token_matches(token):
            error = "That is not the admin token." if self.sessions.enabled else ""
            return self._page(request, "login.html", 401, enabled=self.sessions.enabled, error=error)
        response = self._redirect(request, "/")
        self.sessions.start(request, response)
        return response

    async def logout(self, request: Request) -> Response:
        await self._form(request)
        response = self._redirect(request, "/login")
        self.sessions.end(request, response)
        return response

    # Overview ----------------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        session = self._session(request)
        if isinstance(session, Response):
            return session
        integrations = await self.ops.integrations()
        activity = await self.ops.activity()
        return self._page(
            request,
            "overview.html",
            session=session,
            integrations=integrations,
            activity=activity,
            refresh_s=REFRESH_S,
        )

    # Events ------------------------------------------------------------------------------------

    async def events(self, request: Request) -> Response:
        session = self._session(request)
        if isinstance(session, Response):
            return session
        given = {k: v for k, v in request.query_params.items() if v and k in EVENT_FILTERS}
        error = ""
        try:
            query = shapes.parse(shapes.EventQuery, given)
            page = await self.ops.events(query)
        except InvalidParameter as exc:  # shown beside the form, which keeps what was typed
            error, page = exc.detail, shapes.EventPage(items=[], next_cursor=None)
        kept = {k: v for k, v in given.items() if k != "cursor"}
        return self._page(
            request,
            "events.html",
            422 if error else 200,
            session=session,
            names=self.ops.names,
            filters=kept,
            page=page,
            error=error,
            next_query=urlencode(kept | {"cursor": page.next_cursor}) if page.next_cursor else "",
            first_query=urlencode(kept),
            paged="cursor" in given,
            replay_query=urlencode({k: v for k, v in kept.items() if k in ("integration", "since", "until")}),
        )

    async def event(self, request: Request) -> Response:
        session = self._session(request)
        if isinstance(session, Response):
            return session
        event = await self.ops.event(request.path_params["id"])
        return self._page(
            request,
            "event.html",
            session=session,
            event=event,
            live=event.state not in TERMINAL,
            replayable=event.state in TERMINAL,
            refresh_s=LIVE_REFRESH_S,
        )

    # Actions: each a GET that asks, and a POST that does ----------------------------------------

    async def confirm_replay_event(self, request: Request) -> Response:
        session = self._session(request)
        if isinstance(session, Response):
            return session
        event = await self.ops.event(request.path_params["id"])
        return self._page(request, "confirm_replay.html", session=session, event=event)

    async def replay_event(self, request: Request) -> Response:
        await self._form(request)
        replayed = await self.ops.replay_event(request.path_params["id"])
        return self._redirect(request, f"/events/{replayed.id}", done="replayed")

    async def confirm_state(self, request: Request) -> Response:
        session = self._session(request)
        if isinstance(session, Response):
            return session
        action = _action(request)
        integration = self.ops.integration(request.path_params["name"])
        info = await self.ops.describe(integration)
        return self._page(request, "confirm_state.html", session=session, action=action, integration=info)

    async def set_state(self, request: Request) -> Response:
        await self._form(request)
        action, name = _action(request), request.path_params["name"]
        await (self.ops.pause(name) if action == "pause" else self.ops.resume(name))
        return self._redirect(request, "/", done=f"{action}d", name=name)

    async def confirm_bulk_replay(self, request: Request) -> Response:
        session = self._session(request)
        if isinstance(session, Response):
            return session
        given = {
            k: v for k, v in request.query_params.items() if v and k in ("integration", "since", "until")
        }
        selection = shapes.parse(shapes.ReplayRequest, given)
        if selection.integration is not None:
            self.ops.integration(selection.integration)
        page = await self.ops.events(
            shapes.EventQuery(
                integration=selection.integration,
                state=EventState.DEAD,
                since=selection.since,
                until=selection.until,
                limit=1,
            )
        )
        return self._page(
            request,
            "confirm_bulk.html",
            session=session,
            selection=selection,
            given=given,
            any_dead=bool(page.items),
            nonce=secrets.token_urlsafe(16),
        )

    async def bulk_replay(self, request: Request) -> Response:
        _, form = await self._form(request)
        given = {k: v for k in ("integration", "since", "until") if (v := form.get(k))}
        body = shapes.parse(shapes.ReplayRequest, given)
        nonce = form.get("nonce")
        # the nonce of the confirmation page: a second click of the same button starts nothing new
        job = await self.ops.start_replay(body, f"ui-{nonce}" if nonce else None)
        return self._redirect(request, f"/replays/{job.id}", done="started")

    async def replay_job(self, request: Request) -> Response:
        session = self._session(request)
        if isinstance(session, Response):
            return session
        job = await self.ops.replay_job(request.path_params["id"])
        return self._page(request, "replay.html", session=session, job=job, refresh_s=LIVE_REFRESH_S)

    async def confirm_cancel(self, request: Request) -> Response:
        session = self._session(request)
        if isinstance(session, Response):
            return session
        job = await self.ops.replay_job(request.path_params["id"])
        return self._page(request, "confirm_cancel.html", session=session, job=job)

    async def cancel(self, request: Request) -> Response:
        await self._form(request)
        job = await self.ops.cancel_replay(request.path_params["id"])
        return self._redirect(request, f"/replays/{job.id}", done="cancelled")


EVENT_FILTERS = ("integration", "state", "since", "until", "cursor")


async def _read_form(request: Request) -> dict[str, str]:
    """A small urlencoded form (the dashboard sends no other), read whole up to MAX_FORM_BYTES."""
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_FORM_BYTES:
            raise InvalidParameter("The form is larger than the dashboard accepts.")
    try:
        pairs = parse_qsl(raw.decode("utf-8"), max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        raise InvalidParameter("The form could not be read: send it from the dashboard's page.") from None
    return dict(pairs)


def _action(request: Request) -> str:
    action = str(request.path_params["action"])
    if action not in ("pause", "resume"):
        raise HTTPException(404)
    return action
