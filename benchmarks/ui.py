"""Server time of the dashboard's pages with 100,000 events in Redis.

    python3 benchmarks/ui.py [--events 100000] [--integrations 5] [--requests 300]

Starts a redis-server of its own on a free port, writes `--events` events through the gateway's
own ACCEPT script (spread over `--integrations` integrations, received over the last hour) and an
hour of per-minute chart counters for each integration, then calls the API app of `gateway serve`
in this process, as ASGI, with a logged-in session: each request is timed from the call to the
last byte of the answer (routing, the Redis round trips, the template), which is the page's server
time; no network and no browser are in it.

Pages: the overview (every integration with its counts, health and chart), the first page of
events (50, every integration and state: one sorted-set read per integration and state), a page
filtered by integration and state, the second page of that filter (by cursor), and one event's
detail. Baseline, in the same run: the admin API's JSON of the same data (GET /admin/integrations,
GET /admin/events), so the ratio is what the HTML costs beyond the figures. Aim: the overview and a
page of events under 100 ms p95 each.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

if __package__ in (None, ""):  # run as `python3 benchmarks/ui.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (
    Figure,
    Outcome,
    harness,
    options,
    percentile,
    print_table,
    run_main,
    start_redis,
)
from gateway.app import GatewayApp, create_app
from gateway.events import StoredRequest, new_event_id, now_ms
from gateway.keys import Keys
from gateway.settings import Settings
from gateway.store import LATENCY_BUCKETS, NewEvent, Store, redis_client

TOKEN = "bench-admin-token"
AIM_MS = 100.0
BATCH = 500


@dataclass
class Timed:
    name: str
    path: str
    ms: list[float]
    baseline: str | None = None  # the name of the JSON request it is compared with

    @property
    def p50(self) -> float:
        return percentile(sorted(self.ms), 50)

    @property
    def p95(self) -> float:
        return percentile(sorted(self.ms), 95)


async def call(
    app: GatewayApp, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes = b""
) -> tuple[int, dict[bytes, bytes], bytes, float]:
    """One request to the app as ASGI: (status, headers, body, ms from the call to the last byte)."""
    url = urlsplit(target)
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": url.path,
        "raw_path": url.path.encode(),
        "query_string": url.query.encode(),
        "root_path": "",
        "headers": [(b"host", b"bench"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    sent = False
    status, answer_headers, chunks = 0, {}, []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.Event().wait()  # a disconnect that never comes
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, answer_headers
        if message["type"] == "http.response.start":
            status = message["status"]
            answer_headers = dict(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    started = time.perf_counter()
    await app(scope, receive, send)  # type: ignore[arg-type]
    ms = (time.perf_counter() - started) * 1000
    return status, answer_headers, b"".join(chunks), ms


async def fill(store: Store, keys: Keys, names: list[str], events: int) -> str:
    """`events` events through ACCEPT, and an hour of chart counters; returns one event's id."""
    blob = StoredRequest(
        "POST", "https://crm.example.com/hook", [("content-type", "application/json")], b"{}" * 250
    ).pack()
    start = now_ms() - 3_600_000
    step = 3_600_000 / events
    first = ""
    for offset in range(0, events, BATCH):
        batch = [
            NewEvent(
                new_event_id(int(start + (offset + k) * step)), names[(offset + k) % len(names)], "", blob
            )
            for k in range(min(BATCH, events - offset))
        ]
        first = first or batch[0].event_id
        await store.accept(batch, 60)
    last_minute = now_ms() // 60_000
    async with store.redis.pipeline(transaction=False) as pipe:
        for minute in range(last_minute - 59, last_minute + 1):
            for name in names:
                for b in range(len(LATENCY_BUCKETS) + 1):
                    pipe.hincrby(keys.minute(str(minute)), f"{name}|d{b}", 10 + b)
                    pipe.hincrby(keys.minute(str(minute)), f"{name}|f{b}", b % 3)
        await pipe.execute()
    return first


async def measure(redis_url: str, directory: Path, args: argparse.Namespace) -> list[Timed]:
    names = [f"crm-{n}" for n in range(args.integrations)]
    config = directory / "gateway.toml"
    config.write_text(
        '[gateway]\nstore_credentials = "plain"\n'
        + "".join(f'[[integrations]]\nname = "{n}"\ntarget = "https://crm.example.com/hook"\n' for n in names)
    )
    settings = Settings.from_env(
        env={"REDIS_URL": redis_url, "GATEWAY_CONFIG": str(config), "GATEWAY_ADMIN_TOKEN": TOKEN}
    )
    app = create_app(settings)
    keys = Keys(settings.key_prefix)
    async with app.api.router.lifespan_context(app.api):
        store = Store(redis_client(settings.redis_url), settings.key_prefix)
        started = time.monotonic()
        event_id = await fill(store, keys, names, args.events)
        print(f"wrote {args.events} events in {time.monotonic() - started:.1f} s", file=sys.stderr)
        await store.redis.aclose()

        form = f"token={TOKEN}".encode()
        status, headers, _, _ = await call(
            app, "POST", "/ui/login", [(b"content-type", b"application/x-www-form-urlencoded")], form
        )
        assert status == 303, status
        cookie = headers[b"set-cookie"].split(b";")[0]
        ui = [(b"cookie", cookie)]
        admin = [(b"authorization", f"Bearer {TOKEN}".encode())]
        _, _, page, _ = await call(app, "GET", f"/admin/events?integration={names[0]}&state=pending", admin)
        cursor = orjson.loads(page)["next_cursor"]
        assert cursor, "the filter must have a second page"
        requests = [
            Timed("overview", "/ui/", [], "admin integrations (JSON)"),
            Timed("events, first page", "/ui/events", [], "admin events (JSON)"),
            Timed("events, by integration and state", f"/ui/events?integration={names[0]}&state=pending", []),
            Timed(
                "events, next page (cursor)",
                f"/ui/events?integration={names[0]}&state=pending&cursor={cursor}",
                [],
            ),
            Timed("event detail", f"/ui/events/{event_id}", []),
            Timed("admin integrations (JSON)", "/admin/integrations", []),
            Timed("admin events (JSON)", "/admin/events", []),
        ]
        for _ in range(args.warmup):
            for r in requests:
                await call(app, "GET", r.path, admin if r.path.startswith("/admin") else ui)
        for _ in range(args.requests):
            for r in requests:
                status, _, body, ms = await call(
                    app, "GET", r.path, admin if r.path.startswith("/admin") else ui
                )
                assert status == 200, (r.path, status, body[:300])
                r.ms.append(ms)
        return requests


def run(args: argparse.Namespace) -> Outcome:
    outcome = Outcome()
    with harness("bench-ui-") as h:
        server = start_redis(h)
        timed = asyncio.run(measure(server.url, h.directory, args))
    by_name = {t.name: t for t in timed}
    print_table(
        ["request", "p50 ms", "p95 ms", "max ms"],
        [[t.name, f"{t.p50:.1f}", f"{t.p95:.1f}", f"{max(t.ms):.1f}"] for t in timed],
        [False, True, True, True],
    )
    for t in timed:
        if not t.path.startswith("/ui"):
            continue
        base = by_name[t.baseline] if t.baseline else None
        aimed = t.name in ("overview", "events, first page", "events, by integration and state")
        outcome.figures.append(
            Figure(
                "ui",
                f"{args.events} events, {args.integrations} integrations: {t.name}, server p50 / p95 ms",
                f"{t.p50:.1f} / {t.p95:.1f}",
                f"{base.name} {base.p50:.1f} / {base.p95:.1f}" if base else "-",
                f"{t.p95 / base.p95:.2f}" if base else "-",
                f"p95 < {AIM_MS:g}" if aimed else "-",
                t.p95 < AIM_MS if aimed else None,
            )
        )
    return outcome


def parser() -> argparse.ArgumentParser:
    return options(
        ("--events", 100_000, "events written before the pages are timed"),
        ("--integrations", 5, "integrations they are spread over"),
        ("--requests", 300, "timed requests per page"),
        ("--warmup", 20, "untimed requests per page first"),
        description=__doc__,
    )


def main() -> int:
    p = parser()
    args = p.parse_args()
    if args.events < 2 * BATCH or args.integrations < 1 or args.requests < 1:
        p.error(f"--events at least {2 * BATCH}, --integrations and --requests at least 1")
    os.environ.pop("GATEWAY_KEY_PREFIX", None)
    return run(args).exit_status()


if __name__ == "__main__":
    run_main(main)
