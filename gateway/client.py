"""What the operator commands share: `gateway integrations`, `pause`, `resume`, `events`, `event`,
`replay`, `status` call the admin API (--url and --token, or GATEWAY_URL and GATEWAY_ADMIN_TOKEN)
and print a readable table, or the API's JSON with --json; a refusal ends them with a plain line.

The tables read the answers as the admin API's own models (`gateway.shapes`): each column is a
header and a function of a model, so a field renamed there is a type error here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import IO, Any, NoReturn, TypeVar

import click
import orjson
import pydantic

from gateway import shapes
from gateway.events import AttemptRecord
from gateway.settings import DEFAULT_URL


class Refused(click.ClickException):
    """Ends a command with `gateway: <message>` on stderr, and exit status 1 (2: a bad config)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"gateway: {self.format_message()}", err=True)


def _fail(message: str) -> NoReturn:
    raise Refused(message)


def call(method: str, path: str, url: str, token: str | None, body: Any = None) -> Any:
    base = url.rstrip("/")
    if not token:
        _fail("no admin token: set GATEWAY_ADMIN_TOKEN or pass --token")
    import httpx  # here, not at the top: `serve` and `worker` start without it (0.1-0.3 s each)

    try:
        response = httpx.request(
            method, base + path, headers={"authorization": f"Bearer {token}"}, json=body, timeout=10
        )
    except httpx.HTTPError as exc:
        _fail(f"cannot reach the gateway API at {base} ({type(exc).__name__}: {exc}); is GATEWAY_URL right?")
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.status_code == 401:
        _fail(f"the API at {base} refused the admin token (check GATEWAY_ADMIN_TOKEN)")
    if response.status_code >= 400:
        detail = data.get("detail") if isinstance(data, dict) else response.text[:200]
        _fail(f"{response.status_code}: {detail}")
    if data is None:
        _fail(f"{base} did not answer JSON; is GATEWAY_URL the gateway's API?")
    return data


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.1f} MiB"


def _cells(rows: list[list[str]]) -> None:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


T = TypeVar("T")


def table(items: Sequence[T], columns: dict[str, Callable[[T], str]]) -> None:
    """A plain table: one row per item, one column per (header, cell of an item)."""
    _cells([list(columns)] + [[cell(item) for cell in columns.values()] for item in items])


def _state(i: shapes.Integration) -> str:
    state = "draining" if i.draining else i.state + (f" ({i.paused_by})" if i.paused_by else "")
    if i.waiting_until_ms:
        state += f", waits until {_when(i.waiting_until_ms)}: {i.wait_reason}"
    return state


INTEGRATION_COLUMNS: dict[str, Callable[[shapes.Integration], str]] = {
    "NAME": lambda i: i.name,
    "MODE": lambda i: i.mode,
    "STATE": _state,
    "FAILURES": lambda i: f"{i.consecutive_failures}/{i.failure_threshold}",
    "IN FLIGHT": lambda i: f"{i.counts.in_flight}/{i.max_in_flight}" + (" ordered" if i.ordered else ""),
    "RATE": lambda i: f"{i.rate_limit_per_s:g}/s" if i.rate_limit_per_s else "-",
    "HELD": lambda i: str(i.held),
    "LAST ERROR": lambda i: i.last_error or "-",
}
STATUS_COLUMNS: dict[str, Callable[[shapes.Integration], str]] = {
    "NAME": lambda i: i.name,
    "MODE": lambda i: i.mode,
    "STATE": lambda i: i.state,
    "FAILURES": lambda i: f"{i.consecutive_failures}/{i.failure_threshold}",
    "PENDING": lambda i: str(i.counts.pending),
    "RETRYING": lambda i: str(i.counts.retrying),
    "HELD": lambda i: str(i.counts.held),
    "DEAD": lambda i: str(i.counts.dead),
    "DELIVERED 24H": lambda i: str(i.counts.delivered_24h),
    "COPIES": lambda i: f"{i.cache.copies} ({_size(i.cache.bytes)})" if i.cache else "-",
}
EVENT_COLUMNS: dict[str, Callable[[shapes.EventSummary], str]] = {
    "ID": lambda e: e.id,
    "INTEGRATION": lambda e: e.integration,
    "STATE": lambda e: e.state,
    "ATTEMPT": lambda e: str(e.attempt),
    "RECEIVED": lambda e: _when(e.received_ms),
    "UPDATED": lambda e: _when(e.updated_ms),
}
ATTEMPT_COLUMNS: dict[str, Callable[[AttemptRecord], str]] = {
    "#": lambda a: str(a["n"]),
    "AT": lambda a: _when(a["at_ms"]),
    "STATUS": lambda a: str(a["status"] or "-"),
    "ERROR": lambda a: a["error"] or "-",
    "LATENCY MS": lambda a: f"{a['latency_ms']:.1f}",
    "OUTCOME": lambda a: a["outcome"],
    "ANSWERED": lambda a: a.get("answered") or "-",
}


def _print_integration(i: shapes.Integration) -> None:
    table([i], INTEGRATION_COLUMNS)
    if i.state == "paused" and i.next_probe_ms:
        click.echo(f"next probe: {_when(i.next_probe_ms)}")


def _print_events(page: shapes.EventPage) -> None:
    table(page.items, EVENT_COLUMNS)
    if page.next_cursor:
        click.echo(f"more: --cursor {page.next_cursor}")


def _print_event(e: shapes.Event) -> None:
    click.echo(f"event {e.id}  {e.integration}  {e.state}  received {_when(e.received_ms)}")
    if e.request:
        click.echo(f"  {e.request.method} {e.request.url}")
    table(e.attempts, ATTEMPT_COLUMNS)


def _print_status(status: shapes.Status) -> None:
    click.echo(f"live workers: {status.workers_live}   scheduled attempts: {status.queue_depth}")
    table(status.integrations, STATUS_COLUMNS)
    paused = [i.name for i in status.integrations if i.state == "paused"]
    if paused:
        click.echo(f"paused: {', '.join(paused)}")


def _print_job(job: shapes.ReplayJob) -> None:
    click.echo(
        f"bulk replay {job.id}: {job.status}, {job.matched} matched,"
        f" {job.replayed} replayed, {job.skipped} skipped"
    )


def _print_replay(r: shapes.EventReplay) -> None:
    click.echo(f"event {r.id}: attempt {r.attempt} is {r.state}")


PRINTERS: dict[type[shapes.Shape], Callable[[Any], None]] = {
    shapes.IntegrationList: lambda answer: table(answer.items, INTEGRATION_COLUMNS),
    shapes.Integration: _print_integration,
    shapes.EventPage: _print_events,
    shapes.Event: _print_event,
    shapes.Status: _print_status,
    shapes.ReplayJob: _print_job,
    shapes.EventReplay: _print_replay,
}


def output(data: Any, as_json: bool, shape: type[shapes.Shape]) -> None:
    """The API's answer: its JSON as sent (--json), or read as `shape` and printed as a table."""
    if as_json:
        click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
        return
    try:
        answer = shape.model_validate(data)
    except pydantic.ValidationError as exc:
        _fail(
            f"the API's answer is not a {shape.__name__} ({exc.error_count()} fields differ):"
            " is the gateway at --url this version?"
        )
    PRINTERS[shape](answer)


def api_options(command: Any) -> Any:
    command = click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")(command)
    command = click.option(
        "--token", envvar="GATEWAY_ADMIN_TOKEN", help="Admin token [env: GATEWAY_ADMIN_TOKEN]."
    )(command)
    command = click.option(
        "--url",
        envvar="GATEWAY_URL",
        default=DEFAULT_URL,
        show_default=True,
        help="The gateway API [env: GATEWAY_URL].",
    )(command)
    return command
