"""The dashboard under /ui: driven in real headless Chromium against the real `gateway serve` and
`gateway worker` and a real upstream; its session and CSRF rules also in process.

Chromium is Debian's (/usr/bin/chromium, `apt-get install chromium`), driven by Playwright for
Python; nothing is downloaded. Without it these tests fail, they do not skip.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import httpx
import pytest
import redis
from playwright.sync_api import Browser, Page, expect, sync_playwright

from gateway.app import GatewayApp, create_app
from gateway.events import EventState, now_ms
from gateway.keys import MINUTES_KEPT_S
from gateway.settings import Settings
from gateway.shapes import ReplayFilter
from gateway.store import Store, redis_client
from tests.conftest import KEYS, Gateway, event_record, integration_toml, stored_keys, wait_until
from tests.upstream import Reply, Upstream

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "test-admin-token"  # the Gateway fixture's GATEWAY_ADMIN_TOKEN
WAIT_MS = 20_000  # what a page may take to show a change (a refresh, a delivery, a bulk replay)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: apt-get install -y chromium (the UI tests need it)"
    with sync_playwright() as playwright:
        # --no-sandbox: Chromium's sandbox refuses to run as root, as in CI containers
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    tab = context.new_page()
    try:
        yield tab
    finally:
        context.close()


def zcard(rdb: redis.Redis, key: str) -> int:
    return int(cast(int, rdb.zcard(key)))


def health(rdb: redis.Redis, name: str) -> dict[str, str]:
    fields = cast(dict[bytes, bytes], rdb.hgetall(KEYS.integration(name)))
    return {k.decode(): v.decode() for k, v in fields.items()}


def dead(gateway: Gateway, upstream: Upstream, rdb: redis.Redis, n: int) -> list[str]:
    """n events of "crm" made dead by a 500 (one attempt each); the upstream then answers 200."""
    upstream.script([Reply(500)])
    ids = [gateway.post("/hooks/crm", b'{"ticket": 1}', headers={"x-auth-token": "s3cret"}).json()["id"]]
    ids += [gateway.post("/hooks/crm").json()["id"] for _ in range(n - 1)]
    wait_until(lambda: zcard(rdb, KEYS.state_index("crm", "dead")) == n, timeout=15)
    upstream.script([Reply(200)])
    return ids


def start(gateway: Gateway, upstream: Upstream) -> None:
    gateway.configure(
        integration_toml("crm", upstream.url, failure_threshold=1000, retry={"max_attempts": 1}),
        integration_toml("erp", upstream.url, mode="proxy"),
    ).start()


def log_in(page: Page, gateway: Gateway) -> None:
    page.goto(gateway.url + "/ui/")
    expect(page).to_have_url(re.compile(r"/ui/login$"))
    page.get_by_label("Admin token").fill(TOKEN)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Integrations")).to_be_visible()


def test_an_operator_logs_in_filters_replays_pauses_resumes_and_logs_out(
    gateway: Gateway, upstream: Upstream, rdb: redis.Redis, page: Page
) -> None:
    start(gateway, upstream)
    first, *others = dead(gateway, upstream, rdb, 3)

    # Log in, by keyboard: the token field has the focus, Enter sends the form; a wrong token is refused.
    page.goto(gateway.url + "/ui/")
    expect(page).to_have_url(re.compile(r"/ui/login$"))
    page.keyboard.type("not-the-token")
    page.keyboard.press("Enter")
    expect(page.get_by_role("alert")).to_contain_text("That is not the admin token")
    expect(page.get_by_label("Admin token")).to_be_focused()
    page.keyboard.type(TOKEN)
    page.keyboard.press("Enter")

    # The overview: every integration, its state in words, its dead events and the last hour's chart.
    crm = page.locator('article[data-integration="crm"]')
    expect(crm.locator("[data-state]")).to_have_text("active")
    expect(crm.locator('[data-count="dead"] dd')).to_have_text("3")
    expect(crm.locator("figcaption")).to_contain_text("0 delivered, 3 failed")
    expect(crm.locator(".last-error")).to_contain_text("HTTP 500")
    expect(crm.get_by_role("img")).to_have_attribute("aria-label", re.compile("3 failed"))
    expect(page.locator('article[data-integration="erp"] .tag.mode')).to_have_text("proxy")

    # Events: filtered by integration and state, each row linking to its detail.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Events").click()
    page.get_by_label("Integration").select_option("crm")
    page.get_by_label("State").select_option("dead")
    page.get_by_role("button", name="Show").click()
    expect(page).to_have_url(re.compile(r"integration=crm.*state=dead"))
    expect(page.locator("tbody tr[data-state]")).to_have_count(3)
    expect(page.locator('tbody tr[data-state="dead"]')).to_have_count(3)
    page.get_by_label("State").select_option("delivered")
    page.get_by_role("button", name="Show").click()
    expect(page.locator("tbody")).to_contain_text("No event matches.")

    # A dead event: its request with the credential header redacted, its failed attempt; replayed,
    # the page shows the new delivered attempt by itself.
    page.goto(gateway.url + f"/ui/events/{first}")
    expect(page.locator("#event-state")).to_have_text("dead")
    expect(page.locator("table.headers")).to_contain_text("[redacted]")
    expect(page.locator("table.headers")).not_to_contain_text("s3cret")
    expect(page.locator('li[data-outcome="dead"]')).to_contain_text("HTTP 500")
    page.get_by_role("link", name="Replay…").click()
    expect(page.get_by_role("heading", name="Replay this event?")).to_be_visible()
    assert event_record(rdb, first)["s"] == "dead"  # asking changed nothing
    page.get_by_role("button", name="Replay event").click()
    expect(page.get_by_role("status")).to_contain_text("Replay requested")
    expect(page.locator('li[data-outcome="delivered"]')).to_contain_text("HTTP 200")
    expect(page.locator("#event-state")).to_have_text("delivered")
    assert event_record(rdb, first)["s"] == "delivered"

    # Pause and resume, each confirmed, each with its outcome shown.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Overview").click()
    crm.get_by_role("link", name="Pause…").click()
    expect(page.get_by_role("heading", name="Pause crm?")).to_be_visible()
    assert health(rdb, "crm").get("state") != "paused"
    page.get_by_role("button", name="Pause crm").click()
    expect(page.get_by_role("status")).to_contain_text("crm is paused")
    expect(crm.locator("[data-state]")).to_have_text("paused by hand")
    assert health(rdb, "crm")["state"] == "paused"
    crm.get_by_role("link", name="Resume…").click()
    page.get_by_role("button", name="Resume crm").click()
    expect(page.get_by_role("status")).to_contain_text("crm is resumed")
    expect(crm.locator("[data-state]")).to_have_text("active")
    assert health(rdb, "crm")["state"] == "active"

    # A bulk replay of the dead events that match, confirmed, followed to completion.
    crm.get_by_role("link", name="Replay dead…").click()
    expect(page.get_by_role("heading", name="Replay dead events?")).to_be_visible()
    page.get_by_role("button", name="Replay dead events").click()
    expect(page.locator("#replay-status")).to_have_text("done")
    expect(page.locator("#replay-figures")).to_have_text("2 of 2 done: 2 replayed, 0 skipped")
    expect(page.locator("#replay-progress")).to_have_attribute("value", "2")
    wait_until(lambda: all(event_record(rdb, i)["s"] == "delivered" for i in others), timeout=15)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Overview").click()
    expect(crm.locator("figcaption")).to_contain_text("3 delivered, 3 failed")
    # the chart's counters live in Redis for a bounded time
    minutes = cast(list[bytes], rdb.keys(KEYS.minute("*")))
    assert minutes and all(0 < cast(int, rdb.ttl(k)) <= MINUTES_KEPT_S for k in minutes)

    # The overview refreshes itself: a new delivery and a proxied answer show up without a reload.
    expect(crm.locator('[data-count="delivered_24h"] dd')).to_have_text("3")
    erp = page.locator('article[data-integration="erp"]')
    expect(erp.locator("figcaption")).to_contain_text("0 delivered, 0 failed")
    gateway.post("/hooks/crm")
    assert httpx.get(gateway.url + "/hooks/erp/customers/1", timeout=10).status_code == 200
    # Within two refreshes (every 5 s) of the delivery: a refresh may start just before it ends.
    expect(crm.locator('[data-count="delivered_24h"] dd')).to_have_text("4", timeout=15_000)
    expect(erp.locator("figcaption")).to_contain_text("1 delivered, 0 failed", timeout=15_000)

    # Log out: the session is gone, a page sends the browser back to the login form.
    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(re.compile(r"/ui/login$"))
    page.goto(gateway.url + "/ui/events")
    expect(page).to_have_url(re.compile(r"/ui/login$"))


def test_a_post_without_the_session_or_its_csrf_token_changes_nothing(
    gateway: Gateway, upstream: Upstream, rdb: redis.Redis, page: Page
) -> None:
    start(gateway, upstream)
    (event_id,) = dead(gateway, upstream, rdb, 1)
    log_in(page, gateway)
    cookies = {c["name"]: c["value"] for c in page.context.cookies() if "name" in c and "value" in c}
    page.goto(gateway.url + "/ui/integrations/crm/pause")
    csrf = page.locator('input[name="csrf"]').first.get_attribute("value")
    assert csrf
    before = {k: rdb.dump(k) for k in stored_keys(rdb)}

    attempts = [
        ("/ui/integrations/crm/pause", {"csrf": csrf}, {}),  # no session
        ("/ui/integrations/crm/pause", {"csrf": "wrong"}, cookies),
        ("/ui/integrations/crm/pause", {}, cookies),
        ("/ui/integrations/crm/pause", {"csrf": csrf}, {"gateway_session": "forged.cookie.value"}),
        (f"/ui/events/{event_id}/replay", {"csrf": csrf + "x"}, cookies),
        (f"/ui/events/{event_id}/replay", {"csrf": csrf}, {}),
        ("/ui/replay", {"csrf": "", "integration": "crm"}, cookies),
        ("/ui/replay", {"csrf": csrf, "integration": "crm"}, {}),
    ]
    for path, form, jar in attempts:
        answer = httpx.post(gateway.url + path, data=form, cookies=jar, timeout=10)
        assert answer.status_code == 403, (path, form, answer.text)
        assert answer.headers["content-type"].startswith("text/html")
        assert "Traceback" not in answer.text

    # every key that holds state (not the workers' heartbeats, arq's periodic jobs, the metrics)
    assert {k: rdb.dump(k) for k in stored_keys(rdb)} == before
    assert event_record(rdb, event_id)["s"] == "dead"
    assert health(rdb, "crm").get("state") != "paused"

    # The same form with the session's token does it.
    answer = httpx.post(
        gateway.url + "/ui/integrations/crm/pause", data={"csrf": csrf}, cookies=cookies, timeout=10
    )
    assert answer.status_code == 303
    assert health(rdb, "crm")["state"] == "paused"


# In process: the session cookie's flags, and what a visitor without a session gets.


def in_process(redis_url: str, tmp_path: Path, test: Callable[[GatewayApp], Awaitable[None]]) -> None:
    """Runs `test` against the API app in this process, inside its lifespan."""
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[gateway]\nstore_credentials = "plain"\n' + integration_toml("crm", "http://127.0.0.1:9/")
    )
    env = {"REDIS_URL": redis_url, "GATEWAY_CONFIG": str(config), "GATEWAY_ADMIN_TOKEN": TOKEN}
    app = create_app(Settings.from_env(env=env))

    async def run() -> None:
        async with app.api.router.lifespan_context(app.api):
            await test(app)

    # in a thread of its own: Playwright's sync API keeps an event loop running in this one
    with ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, run()).result()


def test_the_session_cookie_is_signed_httponly_strict_and_secure_over_https(
    redis_url: str, tmp_path: Path
) -> None:
    in_process(redis_url, tmp_path, _cookie_flags)


async def _cookie_flags(app: GatewayApp) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://gw.example") as client:
        answer = await client.post("/ui/login", data={"token": TOKEN})
        assert answer.status_code == 303
        cookie = answer.headers["set-cookie"]
        for flag in ("HttpOnly", "Secure", "SameSite=strict", "Path=/ui", "Max-Age=43200"):
            assert flag in cookie, cookie
        assert (await client.get("/ui/")).status_code == 200
        value = client.cookies["gateway_session"]
        client.cookies.set("gateway_session", value[:-2] + ("AA" if not value.endswith("AA") else "BB"))
        tampered = await client.get("/ui/")
        assert (tampered.status_code, tampered.headers["location"]) == (303, "/ui/login")
    async with httpx.AsyncClient(transport=transport, base_url="http://gw.example") as client:
        answer = await client.post("/ui/login", data={"token": TOKEN})
        assert "Secure" not in answer.headers["set-cookie"]
        refused = await client.post("/ui/login", data={"token": "nope"})
        assert refused.status_code == 401 and "set-cookie" not in refused.headers
        assert "That is not the admin token" in refused.text


def test_without_a_session_pages_send_to_the_login_form(redis_url: str, tmp_path: Path) -> None:
    in_process(redis_url, tmp_path, _without_session)


async def _without_session(app: GatewayApp) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        for path in ("/ui/", "/ui/events", "/ui/events/abc", "/ui/integrations/crm/pause", "/ui/replay"):
            answer = await client.get(path)
            assert (answer.status_code, answer.headers["location"]) == (303, "/ui/login"), path
        # htmx's refresh of a page whose session ended: told where to go, not given a login form to swap in
        polled = await client.get("/ui/", headers={"hx-request": "true"})
        assert (polled.status_code, polled.headers["hx-redirect"]) == (204, "/ui/login")
        login = await client.get("/ui/login")
        assert login.status_code == 200
        assert "script-src 'self'" in login.headers["content-security-policy"]
        assert login.headers["x-frame-options"] == "DENY"
        # everything the page loads comes from the package
        assert re.findall(r'(?:src|href)="([^"]+)"', login.text) == [
            "/ui/static/style.css",
            "/ui/static/htmx.min.js",
            "#main",
            "/ui/",
        ]
        assert (await client.get("/ui/static/htmx.min.js")).status_code == 200


def test_bad_filters_and_unknown_things_get_a_page_that_says_why(redis_url: str, tmp_path: Path) -> None:
    in_process(redis_url, tmp_path, _bad_input)


async def _bad_input(app: GatewayApp) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        await client.post("/ui/login", data={"token": TOKEN})
        bad = await client.get("/ui/events?since=yesterday")
        assert (
            bad.status_code == 422
            and "since: use milliseconds since the epoch or an ISO 8601 time" in bad.text
        )
        unknown = await client.get("/ui/events?integration=nope")
        assert unknown.status_code == 422 and "no integration is named" in unknown.text
        # the outcome notice names only a configured integration: a link cannot put words on the page
        forged = await client.get("/ui/?done=paused&name=Call+0800+to+unlock")
        assert "is paused" not in forged.text and "0800" not in forged.text
        assert "crm is paused" in (await client.get("/ui/?done=paused&name=crm")).text
        for path in ("/ui/events/0123abcd", "/ui/integrations/nope/pause", "/ui/replays/nope", "/ui/nowhere"):
            missing = await client.get(path)
            assert missing.status_code == 404, path
            assert missing.headers["content-type"].startswith("text/html")


def test_a_running_bulk_replay_is_cancelled_after_a_confirmation(redis_url: str, tmp_path: Path) -> None:
    in_process(redis_url, tmp_path, lambda app: _cancel(app, redis_url))


async def _cancel(app: GatewayApp, redis_url: str) -> None:
    store = Store(redis_client(redis_url), KEYS.prefix)
    selection = ReplayFilter(integration="crm", state=EventState.DEAD, since=None, until=None)
    job = {"status": "running", "matched": 2, "replayed": 1, "skipped": 0, "created_ms": now_ms()}
    await store.create_replay("r1", [b"a", b"b"], job | {"filter": selection.model_dump_json()}, 60)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        await client.post("/ui/login", data={"token": TOKEN})
        shown = await client.get("/ui/replays/r1")
        assert 'id="replay-status">running' in shown.text and "1 of 2 done" in shown.text
        assert 'hx-trigger="every' in shown.text  # it follows the replay while it runs
        confirm = await client.get("/ui/replays/r1/cancel")
        assert "Cancel this bulk replay?" in confirm.text
        assert (await store.replay_job("r1") or {})["status"] == b"running"  # asking changed nothing
        csrf = re.search(r'name="csrf" value="([^"]+)"', confirm.text)
        assert csrf
        done = await client.post("/ui/replays/r1/cancel", data={"csrf": csrf.group(1)})
        assert (done.status_code, done.headers["location"]) == (303, "/ui/replays/r1?done=cancelled")
        assert (await store.replay_job("r1") or {})["status"] == b"cancelled"
        after = await client.get(done.headers["location"])
        assert "The bulk replay is cancelled" in after.text and 'id="replay-status">cancelled' in after.text
        assert 'hx-trigger="every' not in after.text

        # An integration that drains its held events says so, in words.
        await store.redis.hset(  # type: ignore[misc]
            KEYS.integration("crm"), mapping={"state": "active", "draining": "1"}
        )
        overview = await client.get("/ui/")
        assert '<span class="tag state draining" data-state>draining held events</span>' in overview.text
    await store.redis.aclose()
