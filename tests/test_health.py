"""Integration health against the real worker processes (invariant 4): consecutive failures are
counted exactly, the threshold pauses, nothing is sent to a paused endpoint but probes, held events
survive a worker restart and drain in arrival order after a resume, a probe resumes a recovered
endpoint, alerts reach a real receiver with retries, and the admin API checks its token."""

from __future__ import annotations

import http.client
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import httpx
import orjson
import pytest
import redis

from tests.conftest import (
    KEYS,
    Gateway,
    InProcessGateway,
    event_record,
    integration_toml,
    stopped_after,
    wait_until,
)
from tests.upstream import Received, Reply, Upstream

TOKEN = "admin-s3cret"
AUTH = {"authorization": f"Bearer {TOKEN}"}
HELD = 100
FAST_RETRY = {"backoff_base_s": 0.05, "backoff_max_s": 0.1, "max_attempts": 20}


@pytest.fixture
def sink() -> Iterator[Upstream]:
    """A second real HTTP server: the receiver of the [[alerts]] sinks."""
    yield from stopped_after(Upstream().start())


def setup(gw: Gateway, *integrations: str, alerts: Sequence[tuple[str, str]] = ()) -> Gateway:
    """Configures the gateway with an admin token, its public URL, and [[alerts]] sinks (kind, url)."""
    gw.extra_env["GATEWAY_ADMIN_TOKEN"] = TOKEN
    gw.extra_env["GATEWAY_URL"] = gw.url
    gw.configure(*integrations)
    text = gw.config_path.read_text()
    for kind, url in alerts:
        text += f'\n[[alerts]]\nkind = "{kind}"\nurl = "{url}"\n'
    gw.config_path.write_text(text)
    return gw


def admin(gw: Gateway, name: str = "crm") -> dict[str, Any]:
    response = gw.get(f"/admin/integrations/{name}", headers=AUTH)
    assert response.status_code == 200, response.text
    return cast(dict[str, Any], response.json())


def cli(gw: Gateway, *args: str, token: str = TOKEN) -> subprocess.CompletedProcess[str]:
    """The real `gateway` command in a subprocess, pointed at the gateway by its environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(GATEWAY_URL=gw.url, GATEWAY_ADMIN_TOKEN=token)
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], env=env, capture_output=True, text=True, timeout=30
    )


def cli_json(gw: Gateway, *args: str) -> dict[str, Any]:
    done = cli(gw, *args, "--json")
    assert done.returncode == 0, done.stderr
    return cast(dict[str, Any], orjson.loads(done.stdout))


def post_many(gw: Gateway, path: str, count: int, threads: int = 8) -> list[str]:
    """Posts `count` hooks concurrently; returns the acknowledged ids."""

    def one(i: int) -> str:
        response = gw.post(path, b'{"n":%d}' % i)
        assert response.status_code == 202, response.text
        return cast(str, response.json()["id"])

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(count)))


def post_in_order(conn: http.client.HTTPConnection, count: int, tag: str) -> list[str]:
    """Posts `count` hooks one after the other, each acknowledged before the next is sent, on one
    kept-alive connection: fast enough (under a millisecond each) that several share a millisecond."""
    ids = []
    for i in range(count):
        conn.request("POST", "/hooks/crm", body=b'{"%s":%d}' % (tag.encode(), i))
        response = conn.getresponse()
        body = response.read()
        assert response.status == 202, body
        ids.append(cast(str, orjson.loads(body)["id"]))
    return ids


def zcard(rdb: redis.Redis, key: str) -> int:
    return cast(int, rdb.zcard(key))


def health_hash(rdb: redis.Redis) -> dict[str, str]:
    fields = cast(dict[bytes, bytes], rdb.hgetall(KEYS.integration("crm")))
    return {k.decode(): v.decode() for k, v in fields.items()}


def alerts_of(sink: Upstream, path: str) -> list[dict[str, Any]]:
    """The alert bodies the sink received on `path`, in arrival order."""
    return [orjson.loads(r.body) for r in sink.wait_for(0) if r.path_qs == path]


# 1. Counting, the threshold, the reset, two workers, warnings once per episode, alert payloads.


@pytest.mark.in_process
def test_threshold_counts_exactly_across_two_workers_and_a_success_resets(
    in_process_gateway: InProcessGateway, upstream: Upstream, sink: Upstream, rdb: redis.Redis
) -> None:
    gateway = in_process_gateway
    # Every request is held 30 ms, so the two workers' deliveries overlap; "/ok" succeeds.
    upstream.responder = lambda r: Reply(200 if r.path_qs == "/ok" else 500, delay_s=0.03)
    setup(
        gateway,
        integration_toml("crm", upstream.url, retry={"max_attempts": 1}),  # the default threshold: 100
        alerts=[("webhook", sink.url + "/hook"), ("slack", sink.url + "/slack")],
    ).start(workers=2)

    def dead() -> int:
        return zcard(rdb, KEYS.state_index("crm", "dead"))

    # 60 failures, then one success: the count goes back to 0.
    post_many(gateway, "/hooks/crm", 60)
    wait_until(lambda: dead() == 60, timeout=20)
    assert admin(gateway)["consecutive_failures"] == 60
    ok = gateway.post("/hooks/crm/ok").json()["id"]
    wait_until(lambda: event_record(rdb, ok).get("s") == "delivered", timeout=10)
    info = admin(gateway)
    assert (info["state"], info["consecutive_failures"]) == ("active", 0)
    assert info["last_success_ms"] is not None

    # 99 failures in a row: one short of the threshold, still active.
    post_many(gateway, "/hooks/crm", 99)
    wait_until(lambda: dead() == 159, timeout=20)
    info = admin(gateway)
    assert (info["state"], info["consecutive_failures"], info["failure_threshold"]) == ("active", 99, 100)
    assert health_hash(rdb)["fails"] == "99"
    assert info["last_error"] == "HTTP 500"
    assert upstream.count() == 160

    # Both workers delivered, and deliveries overlapped (each held 30 ms at the upstream).
    for log_name in ("worker0.log", "worker1.log"):
        assert "(crm): 500 -> dead" in gateway.log(log_name), log_name
    starts = sorted(r.at for r in upstream.wait_for(0))
    assert any(b - a < 0.03 for a, b in itertools.pairwise(starts))

    # The 100th pauses.
    gateway.post("/hooks/crm")
    wait_until(lambda: admin(gateway)["state"] == "paused", timeout=10)
    info = admin(gateway)
    assert (info["paused_by"], info["consecutive_failures"]) == ("failures", 100)
    assert dead() == 160

    # Alerts: one 50% warning per episode (two episodes), one 90% warning, one pause.
    wait_until(lambda: len(alerts_of(sink, "/hook")) >= 4 and len(alerts_of(sink, "/slack")) >= 4, timeout=15)
    time.sleep(0.3)  # room for a duplicate, if the gateway sent one
    hooks = alerts_of(sink, "/hook")
    assert sorted((a["type"], a["consecutive_failures"]) for a in hooks) == [
        ("integration.critical", 90),
        ("integration.paused", 100),
        ("integration.warning", 50),
        ("integration.warning", 50),
    ]
    (paused,) = [a for a in hooks if a["type"] == "integration.paused"]
    assert paused["integration"] == "crm"
    assert paused["threshold"] == 100
    assert paused["last_error"] == "HTTP 500"
    assert paused["held"] == 0
    assert paused["details"] == f"{gateway.url}/admin/integrations/crm"
    assert "PAUSED" in paused["message"]
    slack = alerts_of(sink, "/slack")
    assert all(list(a) == ["text"] for a in slack)
    assert sum("crm is PAUSED after 100 consecutive failed deliveries" in a["text"] for a in slack) == 1
    assert all(f"{gateway.url}/admin/integrations/crm" in a["text"] for a in slack)
    assert upstream.count() == 161


# 2. Paused: nothing sent, events held through a worker restart; the CLI resumes; ordered drain.


def test_paused_holds_events_through_a_worker_restart_and_resume_drains_them_in_order(
    gateway: Gateway, upstream: Upstream, rdb: redis.Redis, request: pytest.FixtureRequest
) -> None:
    # A short probe cool-down: a pause by hand must still never be probed. The endpoint fails the
    # first request, then takes 5 ms per request, so a drain batch (10 events at 100/s) is being
    # sent for a while.
    upstream.script([Reply(500), Reply(200, delay_s=0.005)])
    # A retry 2 to 4 s later: time for the pause through the CLI (a process start, slow on a busy
    # machine) before it comes due (at 1 to 2 s, a loaded run sent it first now and then).
    retry = {"backoff_base_s": 4, "backoff_max_s": 4, "max_attempts": 5}
    setup(
        gateway,
        integration_toml("crm", upstream.url, probe_cooldown_s=0.2, drain_rate_per_s=100, retry=retry),
    )
    worker = gateway.start_worker()
    gateway.start_api()

    # An event that failed once is waiting for its retry when the integration is paused.
    early = gateway.post("/hooks/crm", b'{"early":1}').json()["id"]
    wait_until(lambda: event_record(rdb, early).get("s") == "retrying", timeout=10)
    paused = cli_json(gateway, "pause", "crm")
    assert (paused["name"], paused["state"], paused["paused_by"]) == ("crm", "paused", "operator")
    table = cli(gateway, "integrations")
    assert table.returncode == 0, table.stderr
    assert "paused (operator)" in table.stdout

    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    request.addfinalizer(conn.close)  # also when an assertion fails first (else a ResourceWarning later)
    held = post_in_order(conn, HELD, "held")
    # The retry comes due while paused: it is held too, in its arrival place (first), not sent.
    wait_until(lambda: event_record(rdb, early)["s"] == "held", timeout=10)
    time.sleep(0.5)  # longer than the probe cool-down and many worker polls
    assert upstream.ids() == [early]
    assert [i.decode() for i in cast(list[bytes], rdb.zrange(KEYS.state_index("crm", "held"), 0, -1))] == [
        early,
        *held,
    ]
    assert all(event_record(rdb, e)["s"] == "held" for e in held)

    # The worker dies; its successor sends nothing either, and the events are still held.
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    gateway.start_worker()
    wait_until(lambda: "worker ready" in gateway.log("worker1.log"), timeout=15)
    time.sleep(0.5)
    assert upstream.count() == 1
    assert zcard(rdb, KEYS.state_index("crm", "held")) == 1 + HELD
    listed = cli_json(gateway, "integrations")
    (crm,) = [i for i in listed["items"] if i["name"] == "crm"]
    assert (crm["state"], crm["held"]) == ("paused", 1 + HELD)

    resumed = cli_json(gateway, "resume", "crm")
    assert (resumed["state"], resumed["consecutive_failures"]) == ("active", 0)
    # New events during the drain: a burst at once, then a trickle (slower than the drain) that
    # goes on until the drain is over, so that some arrive while its last batch is being sent.
    # Seconds idle since the held events (a worker restart, two CLI calls): the API may have closed
    # the kept-alive connection (uvicorn's keep-alive timeout, 5 s), so the burst opens a new one.
    conn.close()
    later = post_in_order(conn, 20, "burst")
    assert upstream.count() < 1 + HELD  # the burst came during the drain
    stop = threading.Event()

    def trickle() -> None:
        n = 0
        while not stop.is_set():
            later.extend(post_in_order(conn, 1, f"trickle{n}"))
            n += 1
            time.sleep(0.02)

    poster = threading.Thread(target=trickle)
    poster.start()
    try:
        wait_until(
            lambda: upstream.count() > HELD and zcard(rdb, KEYS.state_index("crm", "held")) == 0, timeout=20
        )
        time.sleep(0.4)
    finally:
        stop.set()
        poster.join()
        conn.close()
    got = upstream.wait_for(2 + HELD + len(later), timeout=20)
    time.sleep(0.3)  # room for a duplicate, if the gateway sent one

    # Each exactly once (the early one: its failed attempt, then once more), in arrival order.
    ids = upstream.ids()
    assert len(ids) == 2 + HELD + len(later)
    assert ids[:2] == [early, early]
    assert ids[2 : 2 + HELD] == held
    assert ids[2 + HELD :] == later
    # At a bounded rate: the first 100 drained at 100/s go in batches of 10 every 0.1 s, so they
    # span 0.9 s or more.
    assert got[HELD].at - got[1].at >= 0.85
    assert all(event_record(rdb, e)["s"] == "delivered" for e in [early, *held, *later])


# 3. The probe: a still-broken endpoint gets only probes, each cool-down twice the last; a
#    recovered one is resumed and drained. 4 (part). The pause alert reaches a receiver that
#    failed it at first.


@pytest.mark.in_process
def test_probe_backs_off_while_broken_then_resumes_and_alert_is_retried(
    in_process_gateway: InProcessGateway, upstream: Upstream, sink: Upstream, rdb: redis.Redis
) -> None:
    gateway = in_process_gateway
    healthy = threading.Event()
    upstream.responder = lambda r: Reply(200 if healthy.is_set() else 500)
    answers: list[tuple[str, int]] = []  # (webhook-id, status) of each request to the alert receiver

    def flaky_sink(r: Received) -> Reply:
        # The receiver fails the first delivery of each alert.
        status = 200 if any(i == r.webhook_id for i, _ in answers) else 500
        answers.append((r.webhook_id, status))
        return Reply(status)

    sink.responder = flaky_sink
    setup(
        gateway,
        integration_toml(
            "crm",
            upstream.url,
            failure_threshold=3,
            probe_cooldown_s=0.3,
            probe_cooldown_max_s=5,
            retry=FAST_RETRY,
        ),
        alerts=[("webhook", sink.url + "/hook")],
    ).start()

    first = gateway.post("/hooks/crm", b'{"first":1}').json()["id"]
    # Three failed attempts of the first event pause the integration; the event waits, held.
    seen: dict[float, int] = {}

    def watch() -> bool:
        h = health_hash(rdb)
        if h.get("state") == "paused" and "cooldown_s" in h:
            seen.setdefault(float(h["cooldown_s"]), int(h["probe_ms"]))
        return h.get("state") == "paused"

    wait_until(watch, timeout=10, interval=0.005)
    assert upstream.ids() == [first] * 3
    others = [gateway.post("/hooks/crm", b'{"other":%d}' % i).json()["id"] for i in range(2)]
    assert zcard(rdb, KEYS.state_index("crm", "held")) == 3

    # Still broken: two probes fail; the cool-down doubles and the next probe moves further.
    wait_until(lambda: watch() and 1.2 in seen, timeout=10, interval=0.005)
    assert list(seen) == [0.3, 0.6, 1.2]
    p1, p2, p3 = seen.values()
    assert p2 - p1 >= 600
    assert p3 - p2 >= 1200
    info = admin(gateway)
    assert (info["state"], info["paused_by"], info["next_probe_ms"]) == ("paused", "failures", p3)
    assert upstream.ids() == [first] * 5  # three attempts, then only the two probes
    assert zcard(rdb, KEYS.state_index("crm", "held")) == 3

    # Recovered: the next probe delivers, the integration resumes, the rest drain in order.
    healthy.set()
    wait_until(lambda: upstream.count() == 8, timeout=10)
    time.sleep(0.3)
    assert upstream.ids() == [first] * 6 + others
    info = admin(gateway)
    assert (info["state"], info["consecutive_failures"], info["held"]) == ("active", 0, 0)
    assert [event_record(rdb, e)["s"] for e in [first, *others]] == ["delivered"] * 3

    # The alerts: each failed once at the receiver, then arrived on the retry.
    wait_until(lambda: len(answers) == 8, timeout=15)
    time.sleep(0.3)  # room for a duplicate, if the gateway sent one
    assert len(answers) == 8
    ids = list(dict.fromkeys(i for i, _ in answers))
    assert sorted(answers) == sorted([(i, 500) for i in ids] + [(i, 200) for i in ids])
    alerts = {a["type"]: a for a in alerts_of(sink, "/hook")}
    assert set(alerts) == {
        "integration.warning",
        "integration.critical",
        "integration.paused",
        "integration.resumed",
    }
    paused = alerts["integration.paused"]
    assert (paused["integration"], paused["consecutive_failures"], paused["threshold"]) == ("crm", 3, 3)
    assert (paused["last_error"], paused["held"]) == ("HTTP 500", 1)
    assert paused["details"] == f"{gateway.url}/admin/integrations/crm"
    assert alerts["integration.resumed"]["reason"] == "a probe was delivered"


# 5. The admin API's token and names.


def test_admin_api_needs_the_token_and_a_known_integration(gateway: Gateway, upstream: Upstream) -> None:
    # An alert sink exists as the internal integration "_alert-0": not reachable through the admin API.
    setup(gateway, integration_toml("crm", upstream.url), alerts=[("webhook", upstream.url)]).start_api()
    base = gateway.url + "/admin/integrations"
    for headers in (
        {},
        {"authorization": "Bearer wrong"},
        {"authorization": TOKEN},
        {"authorization": f"Basic {TOKEN}"},
    ):
        assert httpx.get(base, headers=headers).status_code == 401
        assert httpx.get(base + "/crm", headers=headers).status_code == 401
        response = httpx.post(base + "/crm/pause", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"] == "unauthorized"
    assert admin(gateway)["state"] == "active"  # the refused pause changed nothing

    for method, path in (
        ("GET", "/nope"),
        ("POST", "/nope/pause"),
        ("POST", "/nope/resume"),
        ("GET", "/_alert-0"),
    ):
        response = httpx.request(method, base + path, headers=AUTH)
        assert response.status_code == 404, (method, path)
        assert "nope" in response.json()["detail"] or path == "/_alert-0"

    refused = cli(gateway, "pause", "crm", token="wrong")
    assert refused.returncode == 1
    assert "refused the admin token" in refused.stderr
    unknown = cli(gateway, "resume", "nope")
    assert unknown.returncode == 1
    assert "404" in unknown.stderr
    assert admin(gateway)["state"] == "active"
