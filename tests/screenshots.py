"""Screenshots of every dashboard page, wide (1280 px) and narrow (390 px), for the README.

    GATEWAY_TEST_REDIS_DB=11 python3 -m tests.screenshots [OUT_DIR]   (default docs/screenshots)

Starts the real gateway (API and worker, as the tests do, on the tests' Redis database, which it
flushes) and a real upstream, makes some traffic (one healthy integration, one failing until it is
paused, a proxy, one paused by hand), and photographs the pages in Debian's headless Chromium.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import cast

import httpx
import redis
from playwright.sync_api import Page, expect, sync_playwright

from tests.conftest import KEYS, TEST_DB, Gateway, integration_toml, wait_until
from tests.upstream import Reply, Upstream

WIDTHS = {"wide": (1280, 800), "narrow": (390, 844)}
AUTH = {"authorization": "Bearer test-admin-token"}


def traffic(gateway: Gateway, rdb: redis.Redis) -> str:
    """Events for every integration; returns the id of a dead event."""
    for n in range(40):
        gateway.post("/hooks/crm-actions", b'{"ticket": %d, "event": "ticket.updated"}' % n)
    for n in range(12):
        gateway.post("/hooks/billing", b'{"ticket": %d}' % n, headers={"x-auth-token": "helpdesk-secret"})
    for n in range(8):
        httpx.get(gateway.url + f"/hooks/sidebar/customers/{n}", timeout=10)
    gateway.post("/hooks/erp")
    wait_until(lambda: cast(bytes | None, rdb.hget(KEYS.integration("billing"), "state")) == b"paused", 30)
    wait_until(lambda: cast(int, rdb.zcard(KEYS.state_index("crm-actions", "delivered"))) == 40, 30)
    dead = cast(list[bytes], rdb.zrange(KEYS.state_index("billing", "dead"), 0, 0))
    assert dead, "billing has no dead event"
    httpx.post(gateway.url + "/admin/integrations/erp/pause", headers=AUTH, timeout=10)
    return dead[0].decode()


def shoot(page: Page, out: Path, name: str) -> None:
    for label, (width, height) in WIDTHS.items():
        page.set_viewport_size({"width": width, "height": height})
        page.screenshot(path=str(out / f"{name}-{label}.png"), full_page=True)


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/screenshots")
    out.mkdir(parents=True, exist_ok=True)
    upstream = Upstream().start()
    upstream.responder = lambda r: Reply(500 if r.path_qs.startswith("/billing") else 200)
    url = f"redis://127.0.0.1:6379/{TEST_DB}"
    rdb = redis.Redis.from_url(url)
    rdb.flushdb()
    with tempfile.TemporaryDirectory() as tmp:
        gateway = Gateway(Path(tmp), url)
        try:
            gateway.configure(
                integration_toml("crm-actions", upstream.url + "/crm"),
                integration_toml(
                    "billing", upstream.url + "/billing", failure_threshold=20, retry={"max_attempts": 2}
                ),
                integration_toml("sidebar", upstream.url + "/sidebar", mode="proxy"),
                integration_toml("erp", upstream.url + "/erp", max_in_flight=4),
            ).start()
            dead = traffic(gateway, rdb)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path="/usr/bin/chromium", args=["--no-sandbox"]
                )
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.goto(gateway.url + "/ui/login")
                shoot(page, out, "login")
                page.get_by_label("Admin token").fill("test-admin-token")
                page.get_by_role("button", name="Log in").click()
                expect(page.get_by_role("heading", name="Integrations")).to_be_visible()
                shoot(page, out, "overview")
                page.goto(gateway.url + "/ui/events?integration=billing")
                shoot(page, out, "events")
                page.goto(gateway.url + f"/ui/events/{dead}")
                shoot(page, out, "event")
                page.goto(gateway.url + "/ui/integrations/crm-actions/pause")
                shoot(page, out, "confirm-pause")
                page.goto(gateway.url + "/ui/replay?integration=billing")
                page.get_by_role("button", name="Replay dead events").click()
                expect(page.locator("#replay-status")).to_have_text("done", timeout=30_000)
                shoot(page, out, "bulk-replay")
                browser.close()
        finally:
            gateway.stop()
            upstream.stop()
            rdb.flushdb()
            rdb.close()
    print(f"screenshots in {out}")


if __name__ == "__main__":
    main()
