"""The delivery worker: arq runs one job per attempt; our own keys say what the attempt is for.

A job carries (event id, attempt number, integration). `Deliverer.deliver` claims the attempt
(a fenced, atomic move to in_flight with a lease a few seconds longer than the HTTP deadline),
sends it, and records the outcome in one atomic step that also schedules the next attempt.
`Reconciler` runs in every worker: it takes back attempts whose lease expired (their worker died)
and re-creates arq jobs that are missing (expired, or lost with a failing job) or left locked by a
worker that took them and died or lost Redis before claiming, so an event's fate never depends on
arq's keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Sequence
from typing import Any

import orjson
from arq.connections import RedisSettings, create_pool
from arq.worker import Worker, func
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway import signing
from gateway.alerts import SIGNALS, Alerts
from gateway.delivery import AddressPolicy, ErrorKind, Result, Sender, Verdict, decide
from gateway.drain import Drainer
from gateway.events import AttemptRecord, EventState, StoredRequest, now_ms
from gateway.replays import ReplayRunner
from gateway.settings import Integration, RetryPolicy, Settings
from gateway.store import DELIVER_JOB, HEARTBEAT_S, NOT_COUNTED, Finished, Health, Store

log = logging.getLogger("gateway.worker")

VERDICT_STATE = {
    Verdict.DELIVERED: EventState.DELIVERED,
    Verdict.RETRY: EventState.RETRYING,
    Verdict.DEAD: EventState.DEAD,
}
DAY_MS = 86_400_000
ORPHAN_GRACE_MS = 2000
# A worker that died, or a config that lost the integration, says nothing about the endpoint.
NOT_THE_ENDPOINT = frozenset(
    {ErrorKind.LEASE_EXPIRED, ErrorKind.WORKER_STOPPED, ErrorKind.UNKNOWN_INTEGRATION}
)
ORPHAN_PAGE = 200
TRIM_EVERY = 10  # reconciler rounds between two retention passes


def upstream_headers(
    kept: list[tuple[str, str]], integration: Integration, event_id: str, body: bytes
) -> list[tuple[str, str]]:
    """The helpdesk's headers, the configured ones over them, then the Standard Webhooks ones."""
    configured = {name.lower(): value.get_secret_value() for name, value in integration.headers.items()}
    headers = [(k, v) for k, v in kept if k.lower() not in configured]
    headers += [(name, value) for name, value in configured.items()]
    timestamp = int(time.time())
    headers += [("webhook-id", event_id), ("webhook-timestamp", str(timestamp))]
    if integration.signing_secrets:
        keys = [signing.decode_secret(s.get_secret_value()) for s in integration.signing_secrets]
        headers.append(("webhook-signature", signing.sign(keys, event_id, timestamp, body)))
    return headers


def log_attempt(
    level: int, event_id: str, attempt: int, integration: str, result: Result, finished: Finished | None
) -> None:
    """The one line per delivery attempt, with its fields for a JSON log."""
    outcome = finished.state.value if finished else "ignored (no longer in flight)"
    status = result.status if result.status is not None else result.error
    log.log(
        level,
        "event %s attempt %d (%s): %s -> %s",
        event_id,
        attempt,
        integration,
        status,
        outcome,
        extra={
            "event_id": event_id,
            "attempt": attempt,
            "integration": integration,
            "status": result.status,
            "error": result.error.value if result.error else None,
            "outcome": outcome,
            "latency_ms": result.latency_ms,
        },
    )


class Deliverer:
    """Sends attempts and records them: the one path for arq jobs, drains and probes."""

    def __init__(self, settings: Settings, store: Store, sender: Sender, alerts: Alerts) -> None:
        self._config = settings.config
        self._store = store
        self._sender = sender
        self._alerts = alerts
        self._margin_ms = int(settings.config.worker.lease_margin_s * 1000)
        retention = settings.config.retention
        self._keep_ms = {
            EventState.DELIVERED: int(retention.delivered_days * DAY_MS),
            EventState.DEAD: int(retention.dead_days * DAY_MS),
        }

    def lease_ms(self, integration: Integration | None) -> int:
        timeout_s = integration.timeout_s if integration else self._config.longest_timeout_s
        return int(timeout_s * 1000) + self._margin_ms

    async def deliver(self, ctx: dict[str, Any], event_id: str, attempt: int, name: str) -> str:
        """The arq job: attempt n of an event, if it is still the one due."""
        integration = self._config.integration(name)
        claimed = await self._store.claim(event_id, attempt, self.lease_ms(integration))
        if claimed is None:
            return "stale or held"
        started_ms = now_ms()
        try:
            result, verdict, wait_s = await self.attempt(
                event_id, attempt, name, claimed.received_ms, claimed.request_blob
            )
        except asyncio.CancelledError:
            # The worker is stopping: hand the attempt back now rather than when its lease expires.
            stopped = Result(None, ErrorKind.WORKER_STOPPED, "the worker stopped during the attempt", 0.0)
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    self.record(event_id, attempt, name, stopped, Verdict.RETRY, 0.0, started_ms)
                )
            raise
        await self.record(event_id, attempt, name, result, verdict, wait_s, started_ms)
        return verdict.value

    async def attempt(
        self, event_id: str, attempt: int, name: str, received_ms: int, blob: bytes
    ) -> tuple[Result, Verdict, float]:
        """Sends one claimed attempt; returns its result, the verdict and the wait before a retry."""
        integration = self._config.integration(name)
        if integration is None:
            result = Result(
                None, ErrorKind.UNKNOWN_INTEGRATION, f"no integration {name!r} in the config", 0.0
            )
            policy = RetryPolicy()
        else:
            request = StoredRequest.unpack(blob)
            headers = upstream_headers(request.headers, integration, event_id, request.body)
            result = await self._sender.send(
                request.method, request.url, headers, request.body, integration.timeout_s
            )
            policy = integration.retry
        verdict, wait_s = decide(result, policy, attempt, (now_ms() - received_ms) / 1000)
        return result, verdict, wait_s

    def health(self, name: str, result: Result) -> Health:
        integration = self._config.integration(name)
        if integration is None or integration.internal or result.error in NOT_THE_ENDPOINT:
            return NOT_COUNTED
        if result.ok:
            return Health("S")
        error = f"HTTP {result.status}" if result.status is not None else f"{result.error}: {result.detail}"
        return Health("F", integration.failure_threshold, error, integration.probe_cooldown_s)

    def attempt_record(
        self, attempt: int, result: Result, state: EventState, started_ms: int
    ) -> AttemptRecord:
        return AttemptRecord(
            n=attempt,
            at_ms=started_ms,
            latency_ms=result.latency_ms,
            status=result.status,
            error=result.error.value if result.error else None,
            detail=result.detail,
            outcome=state.value,
            body=result.body.decode("utf-8", "replace"),
        )

    async def record(
        self,
        event_id: str,
        attempt: int,
        integration: str,
        result: Result,
        verdict: Verdict,
        wait_s: float,
        started_ms: int,
        *,
        only_if_lease_expired: bool = False,
        retry_state: EventState = EventState.RETRYING,
    ) -> Finished | None:
        state = VERDICT_STATE[verdict]
        record = self.attempt_record(attempt, result, state, started_ms)
        if verdict is Verdict.RETRY and retry_state is EventState.RETRYING:
            record["retry_in_s"] = round(wait_s, 3)
        health = self.health(integration, result)
        finished = await self._store.finish(
            event_id,
            attempt,
            integration,
            state,
            record,
            health,
            due_ms=now_ms() + int(wait_s * 1000),
            keep_ms=self._keep_ms.get(state, 0),
            only_if_lease_expired=only_if_lease_expired,
            retry_state=retry_state,
        )
        log_attempt(logging.INFO, event_id, attempt, integration, result, finished)
        if finished and finished.signals:
            await self.signal(integration, finished, health)
        return finished

    async def record_many(
        self, integration: str, sent: Sequence[tuple[str, int, Result, Verdict, int]]
    ) -> list[Finished | None]:
        """Records attempts that need no retry (delivered or dead) in one round trip: the drain's
        path, where one FINISH per event cost more than the send. (id, attempt, result, verdict,
        started ms) each."""
        items = []
        for event_id, attempt, result, verdict, started_ms in sent:
            state = VERDICT_STATE[verdict]
            record = self.attempt_record(attempt, result, state, started_ms)
            items.append(
                (
                    event_id,
                    attempt,
                    integration,
                    state,
                    record,
                    self.health(integration, result),
                    self._keep_ms.get(state, 0),
                )
            )
        results = await self._store.finish_many(items)
        delivered = sum(1 for f in results if f is not None and f.state is EventState.DELIVERED)
        log.info(
            "drained %d events of %s: %d delivered",
            len(sent),
            integration,
            delivered,
            extra={"integration": integration},
        )
        for (event_id, attempt, result, _, _), item, finished in zip(sent, items, results, strict=True):
            log_attempt(logging.DEBUG, event_id, attempt, integration, result, finished)
            if finished and finished.signals:
                await self.signal(integration, finished, item[5])
        return results

    async def signal(self, integration: str, finished: Finished, health: Health) -> None:
        """Alerts for what an attempt's record crossed: 50% or 90% of the threshold, or the pause."""
        held = (await self._store.health(integration))["held"] if "paused" in finished.signals else 0
        for signal_name in finished.signals:
            try:
                await self._alerts.send(
                    SIGNALS[signal_name],
                    integration,
                    consecutive_failures=finished.consecutive_failures,
                    last_error=health.last_error,
                    held=held,
                )
            except (RedisError, OSError) as exc:
                log.error("alert %s for %s could not be stored: %s", signal_name, integration, exc)


class Reconciler:
    """Takes back attempts of dead workers and re-creates missing jobs, in every worker process.

    `lock_s` is how long arq locks a job it starts; a lock taken more than ORPHAN_GRACE_MS ago
    whose attempt was never claimed belongs to a worker that is gone.
    """

    def __init__(self, settings: Settings, store: Store, deliverer: Deliverer, lock_s: float) -> None:
        self._config = settings.config
        self._store = store
        self._deliverer = deliverer
        self._interval_s = settings.config.worker.reconcile_interval_s
        self._stale_lock_ms = max(int(lock_s * 1000) - ORPHAN_GRACE_MS, 0)
        self._next_trim = 0.0
        # Where the walk of each due state index goes on at the next round.
        self._offsets: dict[tuple[str, EventState], int] = {}

    async def run_forever(self) -> None:
        while True:
            try:
                await self.run_once()
            except (RedisError, OSError) as exc:
                log.warning("reconciler: Redis unavailable (%s); trying again", exc)
            await asyncio.sleep(self._interval_s)

    async def run_once(self) -> int:
        fixed = 0
        for event_id in await self._store.expired_leases():
            meta = await self._store.meta(event_id)
            if meta is None or meta[0] != EventState.IN_FLIGHT:
                continue
            _, attempt, name, received_ms = meta
            integration = self._config.integration(name)
            result = Result(None, ErrorKind.LEASE_EXPIRED, "the worker sending this attempt stopped", 0.0)
            policy = integration.retry if integration else RetryPolicy()
            spent = attempt >= policy.max_attempts or (now_ms() - received_ms) / 1000 > policy.max_age_s
            verdict = Verdict.DEAD if spent else Verdict.RETRY
            if await self._deliverer.record(
                event_id, attempt, name, result, verdict, 0.0, now_ms(), only_if_lease_expired=True
            ):
                fixed += 1
        for integration in self._config.integrations:
            for state in (EventState.PENDING, EventState.RETRYING):
                fixed += await self._walk(integration.name, state)
        if time.monotonic() >= self._next_trim:
            self._next_trim = time.monotonic() + self._interval_s * TRIM_EVERY
            await self.trim()
        return fixed

    async def trim(self) -> int:
        """Retention: drops the index entries of delivered and dead events whose keys expired.
        Held events are never touched: they carry no expiry and sit in their own index."""
        retention = self._config.retention
        now = now_ms()
        gone = 0
        for integration in [*self._config.integrations, *self._config.alert_sinks]:
            gone += await self._store.trim(
                integration.name, EventState.DELIVERED, now - int(retention.delivered_days * DAY_MS)
            )
            gone += await self._store.trim(
                integration.name, EventState.DEAD, now - int(retention.dead_days * DAY_MS)
            )
        return gone

    async def _walk(self, name: str, state: EventState) -> int:
        """Checks one page of a due state index for events whose job is lost, and re-creates it."""
        stale = self._stale_lock_ms
        offset = self._offsets.get((name, state), 0)
        found, walked = await self._store.orphans(
            name, state, offset, ORPHAN_PAGE, now_ms() - ORPHAN_GRACE_MS, stale
        )
        self._offsets[(name, state)] = offset + walked if walked == ORPHAN_PAGE else 0
        fixed = 0
        for event_id, attempt, due_ms in found:
            if await self._store.reenqueue(event_id, attempt, name, max(due_ms, now_ms()), stale):
                log.info("event %s attempt %d: its job was lost; scheduled again", event_id, attempt)
                fixed += 1
        return fixed


async def _beat(store: Store, worker_id: str) -> None:
    while True:
        try:
            await store.beat(worker_id)
        except (RedisError, OSError) as exc:
            log.warning("heartbeat: Redis unavailable (%s)", exc)
        await asyncio.sleep(HEARTBEAT_S)


def arq_redis_settings(url: str) -> RedisSettings:
    """Reconnect and retry on a lost connection instead of letting a Redis blip end the worker."""
    settings = RedisSettings.from_dsn(url)
    settings.conn_timeout = 1
    settings.conn_retries = 3
    settings.conn_retry_delay = 1
    settings.retry_on_timeout = True
    settings.retry_on_error = [RedisConnectionError, RedisTimeoutError]
    settings.retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=5)
    return settings


def job_timeout_s(settings: Settings) -> float:
    """Above every integration's HTTP deadline plus the store's round trips; arq's lock is this + 10 s."""
    return settings.config.longest_timeout_s + settings.config.worker.lease_margin_s


async def run_worker(settings: Settings, *, burst: bool = False) -> None:
    """Runs one worker until it is stopped by a signal; a lost Redis restarts it, not ends it."""
    logging.getLogger("arq").setLevel(logging.WARNING)
    main = asyncio.current_task()
    assert main is not None
    stopping = asyncio.Event()

    def stop() -> None:
        stopping.set()
        main.cancel()

    while True:
        try:
            await _run_once(settings, burst=burst, stopping=stopping)
            return
        except asyncio.CancelledError:
            return
        except (RedisError, OSError) as exc:
            if stopping.is_set():
                return
            log.warning("worker: Redis unavailable (%s: %s); starting again in 1 s", type(exc).__name__, exc)
        # arq's signal handlers belong to the worker that just ended; until the next one starts, a
        # stop signal must end this loop, or the process could not be stopped while Redis is down.
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, stop)
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            return


async def _run_once(settings: Settings, *, burst: bool, stopping: asyncio.Event) -> None:
    config = settings.config
    queue = settings.key_prefix + ":queue"
    pool = await create_pool(
        arq_redis_settings(settings.redis_url),
        job_serializer=orjson.dumps,
        job_deserializer=orjson.loads,
        default_queue_name=queue,
    )
    store = Store(pool, settings.key_prefix)
    sender = Sender(AddressPolicy(config.gateway.allowed_networks), config.worker.concurrency)
    await sender.start()
    alerts = Alerts(config, settings.public_url, store)
    deliverer = Deliverer(settings, store, sender, alerts)
    worker = Worker(
        functions=[func(deliverer.deliver, name=DELIVER_JOB, timeout=job_timeout_s(settings), keep_result=0)],
        queue_name=queue,
        redis_pool=pool,
        burst=burst,
        max_jobs=config.worker.concurrency,
        poll_delay=config.worker.poll_delay_s,
        keep_result=0,
        job_serializer=orjson.dumps,
        job_deserializer=orjson.loads,
        log_results=False,
        handle_signals=True,
    )
    worker.on_stop = lambda _: stopping.set()
    reconciler = asyncio.create_task(
        Reconciler(settings, store, deliverer, worker.in_progress_timeout_s).run_forever()
    )
    drainer = asyncio.create_task(Drainer(settings, store, deliverer, alerts).run_forever())
    replays = asyncio.create_task(ReplayRunner(store).run_forever())
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    heartbeat = asyncio.create_task(_beat(store, worker_id))
    log.info(
        "worker ready: %d integrations, concurrency %d", len(config.integrations), config.worker.concurrency
    )
    try:
        await worker.async_run()
    finally:
        reconciler.cancel()
        drainer.cancel()
        replays.cancel()
        heartbeat.cancel()
        with contextlib.suppress(Exception):
            await store.redis.zrem(store.keys.workers, worker_id)
        # arq's close() stops waiting at the first job that failed (a lost Redis fails several):
        # let the attempts still sending end before their HTTP session and Redis pool are closed.
        await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
        with contextlib.suppress(Exception):
            await worker.close()
        with contextlib.suppress(Exception):
            await pool.aclose(close_connection_pool=True)
        await sender.close()
