"""What the operator commands share: `gateway integrations`, `pause`, `resume`, `events`, `event`,
`replay`, `status` call the admin API (--url and --token, or GATEWAY_URL and GATEWAY_ADMIN_TOKEN)
and print a readable table, or the API's JSON with --json; a refusal ends them with a plain line.
"""

from __future__ import annotations

import time
from typing import IO, Any, NoReturn

import click
import httpx
import orjson

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


def print_integrations(items: list[dict[str, Any]]) -> None:
    rows = [["NAME", "MODE", "STATE", "FAILURES", "IN FLIGHT", "RATE", "HELD", "LAST ERROR"]]
    for i in items:
        state = i["state"] + (f" ({i['paused_by']})" if i.get("paused_by") else "")
        if i.get("waiting_until_ms"):
            state += f", waits until {_when(i['waiting_until_ms'])}: {i['wait_reason']}"
        failures = f"{i['consecutive_failures']}/{i['failure_threshold']}"
        in_flight = f"{i['counts']['in_flight']}/{i['max_in_flight']}" + (" ordered" if i["ordered"] else "")
        rate = f"{i['rate_limit_per_s']:g}/s" if i.get("rate_limit_per_s") else "-"
        rows.append(
            [
                i["name"],
                i["mode"],
                state,
                failures,
                in_flight,
                rate,
                str(i["held"]),
                i.get("last_error") or "-",
            ]
        )
    table(rows)


def table(rows: list[list[str]]) -> None:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


def print_events(data: dict[str, Any]) -> None:
    rows = [["ID", "INTEGRATION", "STATE", "ATTEMPT", "RECEIVED", "UPDATED"]]
    for e in data["items"]:
        rows.append(
            [
                e["id"],
                e["integration"],
                e["state"],
                str(e["attempt"]),
                _when(e["received_ms"]),
                _when(e["updated_ms"]),
            ]
        )
    table(rows)
    if data.get("next_cursor"):
        click.echo(f"more: --cursor {data['next_cursor']}")


def print_event(data: dict[str, Any]) -> None:
    click.echo(
        f"event {data['id']}  {data['integration']}  {data['state']}  received {_when(data['received_ms'])}"
    )
    request = data.get("request")
    if request:
        click.echo(f"  {request['method']} {request['url']}")
    rows = [["#", "AT", "STATUS", "ERROR", "LATENCY MS", "OUTCOME", "ANSWERED"]]
    for a in data["attempts"]:
        rows.append(
            [
                str(a["n"]),
                _when(a["at_ms"]),
                str(a["status"] or "-"),
                a["error"] or "-",
                f"{a['latency_ms']:.1f}",
                a["outcome"],
                a.get("answered") or "-",
            ]
        )
    table(rows)


def output(data: Any, as_json: bool, kind: str = "integration") -> None:
    if as_json:
        click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    elif kind == "events":
        print_events(data)
    elif kind == "event":
        print_event(data)
    elif kind == "status":
        click.echo(f"live workers: {data['workers_live']}   scheduled attempts: {data['queue_depth']}")
        rows = [
            [
                "NAME",
                "MODE",
                "STATE",
                "FAILURES",
                "PENDING",
                "RETRYING",
                "HELD",
                "DEAD",
                "DELIVERED 24H",
                "COPIES",
            ]
        ]
        for i in data["integrations"]:
            c = i["counts"]
            cache = i.get("cache")
            rows.append(
                [
                    i["name"],
                    i["mode"],
                    i["state"],
                    f"{i['consecutive_failures']}/{i['failure_threshold']}",
                    *(str(c[k]) for k in ("pending", "retrying", "held", "dead", "delivered_24h")),
                    f"{cache['copies']} ({_size(cache['bytes'])})" if cache else "-",
                ]
            )
        table(rows)
        paused = [i["name"] for i in data["integrations"] if i["state"] == "paused"]
        if paused:
            click.echo(f"paused: {', '.join(paused)}")
    elif kind == "bulk":
        click.echo(
            f"bulk replay {data['id']}: {data['status']}, {data['matched']} matched, "
            f"{data['replayed']} replayed, {data['skipped']} skipped"
        )
    elif kind == "replay":
        click.echo(f"event {data['id']}: attempt {data['attempt']} is {data['state']}")
    elif "items" in data:
        print_integrations(data["items"])
    else:
        print_integrations([data])
        if data.get("state") == "paused" and data.get("next_probe_ms"):
            click.echo(f"next probe: {_when(data['next_probe_ms'])}")


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
