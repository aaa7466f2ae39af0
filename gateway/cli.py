"""The `gateway` command."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import quote, urlencode

import click
import orjson

from gateway import client, shapes
from gateway.errors import ConfigError
from gateway.events import EventState
from gateway.settings import DEFAULT_CONFIG_PATH, DEFAULT_URL, Settings, load_config


def _settings(config_path: str | None = None) -> Settings:
    """Settings from the environment; a bad config ends the process with file, field and reason."""
    try:
        return Settings.from_env(config_path)
    except ConfigError as exc:
        raise client.Refused(f"invalid config: {exc}", exit_code=2) from None


def _logging(default_format: str = "json") -> None:
    from gateway.logs import configure

    configure(default_format)


@click.group()
def main() -> None:
    """Self-hosted webhook gateway: accept helpdesk webhooks, keep them in Redis, deliver with retries."""


@main.command("check-config")
@click.argument("path", required=False)
def check_config(path: str | None) -> None:
    """Validate a config file (default: $GATEWAY_CONFIG or config/gateway.toml)."""
    path = path or os.environ.get("GATEWAY_CONFIG") or DEFAULT_CONFIG_PATH
    try:
        config = load_config(path)
    except ConfigError as exc:
        raise client.Refused(f"invalid config: {exc}", exit_code=2) from None
    click.echo(f"{path}: ok, {len(config.integrations)} integration(s)")


def _refuse_unsealed(settings: Settings) -> None:
    reason = settings.unsealed_reason()
    if reason is not None:
        raise client.Refused(reason, exit_code=2)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
def serve(host: str, port: int) -> None:
    """Run the API process: the helpdesk's URLs (relay and proxy), the admin API, metrics, health."""
    import uvicorn

    from gateway.app import create_app, serve_config

    _logging()
    settings = _settings()
    if settings.admin_token is None:
        raise client.Refused(
            "GATEWAY_ADMIN_TOKEN is not set; the API will not start with an unprotected admin API "
            "(set it to a long random string; `gateway dev` makes one for you)",
            exit_code=2,
        )
    _refuse_unsealed(settings)
    app = create_app(settings)
    uvicorn.Server(serve_config(app, settings, host=host, port=port, loop="uvloop")).run()


@main.command()
def worker() -> None:
    """Run one delivery worker process."""
    import uvloop

    from gateway.worker import run_worker

    _logging()
    settings = _settings()
    _refuse_unsealed(settings)
    uvloop.run(run_worker(settings))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--echo-port",
    default=8001,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="Port of the demo echo endpoint.",
)
def dev(host: str, port: int, echo_port: int) -> None:
    """Everything on one machine: Redis (embedded unless REDIS_URL is set), the API, one worker
    and the demo echo endpoint."""
    from gateway.dev import run_dev

    os.environ.setdefault("GATEWAY_LOG_FORMAT", "console")
    _logging("console")
    _settings()  # refuse to start on a bad config before anything is spawned
    sys.exit(run_dev(host, port, echo_port))


@main.command("demo-endpoint")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8001, show_default=True, type=click.IntRange(1, 65535))
def demo_endpoint(host: str, port: int) -> None:
    """Serve only the demo echo endpoint (`gateway dev` runs it too): it logs what it is sent and
    answers 200 with JSON. For a demo in containers (docker-compose.yml)."""
    import uvicorn

    from gateway.dev import echo_app

    _logging("console")
    uvicorn.run(echo_app(), host=host, port=port, access_log=False, log_level="warning")


@main.command()
@client.api_options
def integrations(url: str, token: str | None, as_json: bool) -> None:
    """List integrations with their state, failures and held events."""
    client.output(client.call("GET", "/admin/integrations", url, token), as_json, shapes.IntegrationList)


@main.command()
@click.argument("name")
@client.api_options
def pause(name: str, url: str, token: str | None, as_json: bool) -> None:
    """Pause an integration: nothing is sent to it, new events are held (no automatic probes)."""
    _integration_action(name, "pause", url, token, as_json)


@main.command()
@click.argument("name")
@client.api_options
def resume(name: str, url: str, token: str | None, as_json: bool) -> None:
    """Resume an integration: its held events are delivered in arrival order, at a bounded rate."""
    _integration_action(name, "resume", url, token, as_json)


def _integration_action(name: str, action: str, url: str, token: str | None, as_json: bool) -> None:
    path = f"/admin/integrations/{quote(name)}/{action}"
    client.output(client.call("POST", path, url, token), as_json, shapes.Integration)


@main.command()
@click.option("--integration", help="Only this integration's events.")
@click.option("--state", type=click.Choice([s.value for s in EventState]))
@click.option("--since", help="Received at or after: ms since the epoch or an ISO 8601 time.")
@click.option("--until", help="Received at or before: ms since the epoch or an ISO 8601 time.")
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@click.option("--cursor", help="The next_cursor of the previous page.")
@client.api_options
def events(
    integration: str | None,
    state: str | None,
    since: str | None,
    until: str | None,
    limit: int,
    cursor: str | None,
    url: str,
    token: str | None,
    as_json: bool,
) -> None:
    """List events, newest first."""
    params = {"integration": integration, "state": state, "since": since, "until": until, "cursor": cursor}
    query = urlencode({"limit": limit, **{k: v for k, v in params.items() if v}})
    client.output(client.call("GET", f"/admin/events?{query}", url, token), as_json, shapes.EventPage)


@main.command()
@click.argument("event_id")
@client.api_options
def event(event_id: str, url: str, token: str | None, as_json: bool) -> None:
    """Show one event: its request and every attempt."""
    client.output(client.call("GET", f"/admin/events/{quote(event_id)}", url, token), as_json, shapes.Event)


@main.command()
@click.argument("event_id", required=False)
@click.option("--integration", help="Bulk: only this integration's events.")
@click.option(
    "--state",
    type=click.Choice([s.value for s in EventState]),
    help="Bulk: events in this state (default dead).",
)
@click.option("--since", help="Bulk: received at or after (ms since the epoch or ISO 8601).")
@click.option("--until", help="Bulk: received at or before.")
@click.option("--show", "show_id", metavar="REPLAY_ID", help="Show a bulk replay's progress.")
@click.option("--cancel", "cancel_id", metavar="REPLAY_ID", help="Cancel a bulk replay.")
@client.api_options
def replay(
    event_id: str | None,
    integration: str | None,
    state: str | None,
    since: str | None,
    until: str | None,
    show_id: str | None,
    cancel_id: str | None,
    url: str,
    token: str | None,
    as_json: bool,
) -> None:
    """Send events again (same webhook-id): one by ID, or every one matching the filters."""
    if event_id:
        data = client.call("POST", f"/admin/events/{quote(event_id)}/replay", url, token)
        client.output(data, as_json, shapes.EventReplay)
    elif show_id:
        client.output(
            client.call("GET", f"/admin/replays/{quote(show_id)}", url, token), as_json, shapes.ReplayJob
        )
    elif cancel_id:
        data = client.call("POST", f"/admin/replays/{quote(cancel_id)}/cancel", url, token)
        client.output(data, as_json, shapes.ReplayJob)
    else:
        body = {"integration": integration, "state": state, "since": since, "until": until}
        data = client.call("POST", "/admin/replay", url, token, {k: v for k, v in body.items() if v})
        client.output(data, as_json, shapes.ReplayJob)


@main.command()
@client.api_options
def status(url: str, token: str | None, as_json: bool) -> None:
    """Live workers, queue depth, and every integration with its events by state."""
    client.output(client.call("GET", "/admin/status", url, token), as_json, shapes.Status)


@main.group("import")
def import_() -> None:
    """Move a helpdesk's HTTP integrations behind the gateway."""


@import_.command("gorgias")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--account", metavar="URL", help="https://ACCOUNT.gorgias.com; GORGIAS_USERNAME, GORGIAS_API_KEY."
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The config to merge into [default: $GATEWAY_CONFIG or config/gateway.toml].",
)
@click.option(
    "--env-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where the secrets go (created 0600, never overwritten) [default: gorgias.env beside the config].",
)
@click.option(
    "--mode", "modes", multiple=True, metavar="NAME=MODE", help="all=relay, or NAME=proxy; repeatable."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--apply", is_flag=True, help="Point the Gorgias integrations at the gateway.")
@click.option("--reactivate", is_flag=True, help="With --apply: switch deactivated integrations back on.")
@click.option(
    "--backup",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --apply: where the originals are saved [default: gorgias-backup-TIME.json beside the config].",
)
@click.option(
    "--revert",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="BACKUP",
    help="Put back the integrations saved by an --apply.",
)
@click.option(
    "--url",
    envvar="GATEWAY_URL",
    default=DEFAULT_URL,
    show_default=True,
    help="The gateway as the helpdesk reaches it [env: GATEWAY_URL].",
)
def import_gorgias(
    file: Path | None,
    account: str | None,
    out: Path | None,
    env_file: Path | None,
    modes: tuple[str, ...],
    as_json: bool,
    apply: bool,
    reactivate: bool,
    backup: Path | None,
    revert: Path | None,
    url: str,
) -> None:
    """Move Gorgias HTTP integrations behind the gateway: from FILE (a saved answer of
    GET /api/integrations?type=http) or --account; writes the config entries and an env file of
    secrets, and with --apply points each integration at the gateway."""
    from gateway.errors import ImportRefused
    from gateway.importers import gorgias

    try:
        if revert is not None:
            if file is not None or apply or reactivate or modes:
                raise ImportRefused("--revert BACKUP takes only --account (and --json)")
            base, done = gorgias.run_revert(revert, account)
            if as_json:
                click.echo(orjson.dumps({"account": base, "reverted": done}, option=orjson.OPT_INDENT_2))
            else:
                click.echo(f"put back {len(done)} integration(s) in {base}: {', '.join(done) or 'none'}")
            return
        config_path = out or Path(os.environ.get("GATEWAY_CONFIG") or DEFAULT_CONFIG_PATH)
        report = gorgias.run_import(
            document=file,
            account=account,
            config_path=config_path,
            env_file=env_file,
            backup=backup,
            modes=modes,
            apply=apply,
            reactivate=reactivate,
            gateway_url=url.rstrip("/"),
        )
    except ImportRefused as exc:
        raise client.Refused(str(exc)) from None
    if as_json:
        click.echo(orjson.dumps(report.as_json(), option=orjson.OPT_INDENT_2))
        return
    for line in report.lines():
        click.echo(line)
    if report.entries and gorgias.loopback(url):
        click.echo(
            f"note: {url} is a loopback address; set GATEWAY_URL to where Gorgias reaches the gateway",
            err=True,
        )
