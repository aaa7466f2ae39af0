"""The delivery worker: a pump takes due attempts off our own schedule in batches and sends them.

The schedule is the `due` sorted set that ACCEPT, FINISH_MANY and REPLAY write in the same script
as the event's state, so no event can be left without one. `Pump` takes up to a batch of due
attempts in one call (CLAIM_DUE: each moves to in_flight under a lease a few seconds longer than
its integration's HTTP deadline), sends them concurrently, up to `worker.concurrency` at a time,
and the attempts that end together are recorded in one call (FINISH_MANY, via a `Batcher`), which
also schedules each retry. One arq job per attempt was measured at about 1,000 no-op jobs/s per
process (four round trips to start a job), below what one worker must deliver; so arq runs the
worker's periodic work (retention) and our keys hold every event's truth.
`Reconciler` runs in every worker: it takes back attempts whose lease expired (their worker died).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from arq import cron
from arq.connections import RedisSettings, create_pool
from arq.worker import Worker
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway import redis_url
from gateway.alerts import Alerts
from gateway.delivery import (
    ACCEPT_ENCODING,
    AddressPolicy,
    ErrorKind,
    Result,
    Sender,
    Verdict,
    decide,
    upstream_headers,
)
from gateway.drain import Drainer
from gateway.events import AttemptRecord, EventState, StoredRequest, now_ms
from gateway.replays import ReplayRunner
from gateway.sealing import Unsealable, open_headers
from gateway.settings import DEFAULT_MAX_IN_FLIGHT, Config, Integration, RetryPolicy, Settings
from gateway.store import HEARTBEAT_S, Batcher, Claimed, Finish, Finished, Store, every, health_of

log = logging.getLogger("gateway.worker")

# Answers whose Retry-After holds the whole integration, not only the event that got it.
BACKPRESSURE = frozenset({429, 503})
VERDICT_STATE = {
    Verdict.DELIVERED: EventState.DELIVERED,
    Verdict.RETRY: EventState.RETRYING,
    Verdict.DEAD: EventState.DEAD,
}
DAY_MS = 86_400_000
MAX_CLAIM = 256  # due attempts taken in one call
# The longest an idle pump waits on the bell: a bound for what it might miss (it misses nothing:
# every script that makes an attempt due sooner rings it).
IDLE_WAIT_S = 10.0
LISTEN_S = 10.0  # one BLPOP on the bell
FINISH_TIMEOUT_S = 10.0  # a recording that takes longer fails; the lease then brings the attempt back
# How long an attempt's record waits for others to share its script call. The endpoint already has
# the request, so this delays only the record (by less than the lease margin), not the delivery.
# An attempt counts against its integration's max_in_flight until it is recorded, so the wait is
# short: with 5 ms, one integration at the default cap of 32 delivered 3,300/s from a backlog,
# where its attempts spent more time waiting for their record than out at the endpoint.
FINISH_LINGER_S = 0.001


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
    """Sends attempts and records them: the one path for the pump, drains and probes."""

    def __init__(self, settings: Settings, store: Store, sender: Sender, alerts: Alerts) -> None:
        self._config = settings.config
        self._sealer = settings.sealer
        self._store = store
        self._sender = sender
        self._alerts = alerts
        self._margin_ms = int(settings.config.worker.lease_margin_s * 1000)
        self._finisher: Batcher[Finish, Finished | None] = Batcher(
            store.finish_many, FINISH_TIMEOUT_S, lambda exc: exc, linger_s=FINISH_LINGER_S
        )

    def lease_ms(self, integration: Integration | None) -> int:
        timeout_s = integration.timeout_s if integration else self._config.longest_timeout_s
        return int(timeout_s * 1000) + self._margin_ms

    async def flush(self) -> None:
        """Waits for the records still being written."""
        await self._finisher.flush()

    async def deliver(self, claimed: Claimed, sent: Callable[[], None] = lambda: None) -> None:
        """Sends a claimed attempt and records how it ended; calls `sent` between the two."""
        event_id, attempt, name = claimed.event_id, claimed.attempt, claimed.integration
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
        sent()
        waited_s = max(0.0, (started_ms - claimed.due_ms) / 1000) if claimed.due_ms else None
        await self.record(event_id, attempt, name, result, verdict, wait_s, started_ms, waited_s=waited_s)

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
            policy = integration.retry
            try:
                kept = open_headers(self._sealer, request.headers)
            except Unsealable as exc:
                result = Result(None, ErrorKind.SEALED, str(exc), 0.0)
                return result, Verdict.DEAD, 0.0
            headers = upstream_headers(
                kept, integration, event_id, request.body, accept_encoding=ACCEPT_ENCODING
            )
            result = await self._sender.send(
                request.method, request.url, headers, request.body, integration.timeout_s
            )
        verdict, wait_s = decide(result, policy, attempt, (now_ms() - received_ms) / 1000)
        return result, verdict, wait_s

    def finish_item(
        self,
        event_id: str,
        attempt: int,
        integration: str,
        result: Result,
        verdict: Verdict,
        started_ms: int,
        wait_s: float = 0.0,
        *,
        only_if_lease_expired: bool = False,
        retry_state: EventState = EventState.RETRYING,
        waited_s: float | None = None,
    ) -> Finish:
        """How an attempt ended, as FINISH_MANY records it: its attempt record, what it says about
        its integration's health, when a retry is due, and whether the endpoint asked the whole
        integration to wait (a 429 or 503 with Retry-After)."""
        state = VERDICT_STATE[verdict]
        configured = self._config.integration(integration)
        hold_until, reason = 0, ""
        if result.status in BACKPRESSURE and result.retry_after_s is not None and configured is not None:
            wait = min(result.retry_after_s, configured.retry.backoff_max_s)
            hold_until = now_ms() + int(wait * 1000)
            reason = f"HTTP {result.status} with Retry-After: {wait:g} s"
        record = AttemptRecord(
            n=attempt,
            at_ms=started_ms,
            latency_ms=result.latency_ms,
            status=result.status,
            error=result.error.value if result.error else None,
            detail=result.detail,
            outcome=state.value,
            # An endpoint that echoes a configured credential does not get it shown.
            body=configured.redact(result.body.decode("utf-8", "replace"))
            if configured is not None
            else result.body.decode("utf-8", "replace"),
        )
        if verdict is Verdict.RETRY and retry_state is EventState.RETRYING:
            record["retry_in_s"] = round(wait_s, 3)
        return Finish(
            event_id,
            attempt,
            state,
            record,
            health_of(configured, result),
            due_ms=now_ms() + int(wait_s * 1000),
            only_if_lease_expired=only_if_lease_expired,
            retry_state=retry_state,
            waited_s=waited_s,
            hold_until_ms=hold_until,
            hold_reason=reason,
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
        waited_s: float | None = None,
    ) -> Finished | None:
        item = self.finish_item(
            event_id,
            attempt,
            integration,
            result,
            verdict,
            started_ms,
            wait_s,
            only_if_lease_expired=only_if_lease_expired,
            retry_state=retry_state,
            waited_s=waited_s,
        )
        finished = await self._finisher.submit(item)
        log_attempt(logging.INFO, event_id, attempt, integration, result, finished)
        if finished and item.hold_until_ms:
            log.info(
                "integration %s waits: its endpoint answered %s",
                integration,
                item.hold_reason,
                extra={"integration": integration},
            )
        if finished and finished.signals:
            await self._alerts.crossed(integration, finished, item.health.last_error)
        return finished

    async def record_many(
        self, integration: str, sent: Sequence[tuple[str, int, Result, Verdict, int]]
    ) -> list[Finished | None]:
        """Records attempts that need no retry (delivered or dead) in one round trip: the drain's
        path, where one FINISH per event cost more than the send. (id, attempt, result, verdict,
        started ms) each."""
        items = [
            self.finish_item(
                event_id, attempt, integration, result, verdict, started_ms, retry_state=EventState.HELD
            )
            for event_id, attempt, result, verdict, started_ms in sent
        ]
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
                await self._alerts.crossed(integration, finished, item.health.last_error)
        return results


class Bell:
    """Wakes an idle pump when a script rings the bell (something became due sooner).

    Redis checks a blocked command's timeout only about ten times a second (its `hz`), so a BLPOP
    cannot time a wait for a retry or a rate token: the pump keeps its own timer, and one BLPOP at
    a time listens for the bell meanwhile (a listener outlives a wait it did not end, and serves the
    next). A ring that reaches this worker while it is busy is passed on, for an idle one.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._rung = asyncio.Event()
        self._waiting = False
        self._listener: asyncio.Task[None] | None = None

    async def wait(self, timeout_s: float) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen())
        self._waiting = True
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._rung.wait()
        finally:
            self._waiting = False
            self._rung.clear()

    async def _listen(self) -> None:
        try:
            if not await self._store.wait_for_bell(LISTEN_S):
                return
            if self._waiting:
                self._rung.set()
            else:
                await self._store.ring()
        except (RedisError, OSError) as exc:
            log.debug("bell: Redis unavailable (%s)", exc)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()


def _policy(lease_ms: int, integration: Integration) -> list[int | float]:
    """An integration's limits as CLAIM_DUE reads them."""
    rate = integration.rate_limit_per_s or 0
    return [lease_ms, integration.slots, rate, integration.burst, 1 if integration.ordered else 0]


class Pump:
    """Takes due attempts off the schedule in batches and sends them, up to `concurrency` at once.

    A slot is taken while an attempt's HTTP request is out and freed as soon as it has ended (its
    record is then written with others). While the worker is busy it waits until a quarter of its
    slots are free before it takes more, so that a call takes a batch rather than one event. The
    claim shares a batch between the integrations with due attempts, each within its own
    `max_in_flight` and rate (see CLAIM_DUE), so a hanging endpoint holds at most its own share.
    When less was due than it asked for, the pump waits on Redis (BLPOP on the bell that accepting,
    retrying and replaying ring) until the earliest ready time, instead of polling: an idle worker
    costs Redis about one command a second, and a new event starts at once.
    """

    def __init__(self, settings: Settings, store: Store, deliverer: Deliverer) -> None:
        config = settings.config
        self._store = store
        self._deliverer = deliverer
        self._capacity = config.worker.concurrency
        self._grace_s = config.worker.shutdown_grace_s
        self._floor = max(1, self._capacity // 4)
        self._poll_s = config.worker.poll_delay_s
        integrations = [*config.integrations, *config.alert_sinks]
        self._policies = orjson.dumps({i.name: _policy(deliverer.lease_ms(i), i) for i in integrations})
        self._default = orjson.dumps([deliverer.lease_ms(None), DEFAULT_MAX_IN_FLIGHT, 0, 1, 0])
        self._sending: set[asyncio.Task[None]] = set()  # HTTP request out: holds a slot
        self._tasks: set[asyncio.Task[None]] = set()  # sending or recording
        self._room = asyncio.Event()
        self._bell = Bell(store)
        self._empty = 0  # claims in a row that took nothing though something was ready

    async def run_forever(self) -> None:
        try:
            while True:
                free = self._capacity - len(self._sending)
                if free < self._floor:
                    self._room.clear()
                    await self._room.wait()
                    continue
                limit = min(free, MAX_CLAIM)
                try:
                    claimed, next_ms = await self._store.claim_due(limit, self._policies, self._default)
                    for attempt in claimed:
                        self._start(attempt)
                    if len(claimed) < limit:
                        await self._idle(next_ms, took=bool(claimed))
                except (RedisError, OSError) as exc:
                    log.warning("pump: Redis unavailable (%s); trying again in 1 s", exc)
                    await asyncio.sleep(1)
        finally:
            await self.stop()

    async def _idle(self, next_ms: int, *, took: bool) -> None:
        """Waits for the bell, or until the earliest ready time (`next_ms`, 0: none)."""
        wait_s = IDLE_WAIT_S if next_ms == 0 else min(IDLE_WAIT_S, (next_ms - now_ms()) / 1000)
        if wait_s <= 0:
            if took:
                return  # more may be due at once
            # Ready, yet nothing could be taken (a clock a millisecond apart): never spin.
            self._empty = min(self._empty + 1, 10)
            wait_s = min(self._poll_s, 0.0005 * 2**self._empty)
        else:
            self._empty = 0
        await self._bell.wait(wait_s)

    def _start(self, attempt: Claimed) -> None:
        task: asyncio.Task[None] = asyncio.create_task(
            self._deliverer.deliver(attempt, lambda: self._free(task))
        )
        self._sending.add(task)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _free(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        if self._capacity - len(self._sending) >= self._floor:
            self._room.set()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._free(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Its record could not be written (Redis lost): the lease brings the attempt back.
            log.warning(
                "an attempt could not be recorded (%s: %s); its lease will bring it back",
                type(exc).__name__,
                exc,
            )

    async def stop(self) -> None:
        """Takes nothing more; lets the attempts being sent end within the shutdown grace, hands
        back the rest (each records itself as stopped), and waits for every record."""
        self._bell.close()
        if self._sending and self._grace_s > 0:
            log.info("stopping: %d attempts in flight get %g s to end", len(self._sending), self._grace_s)
            await asyncio.wait(set(self._sending), timeout=self._grace_s)
        if self._sending:
            log.info("stopping: handing back %d attempts still in flight", len(self._sending))
        for task in self._sending:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._deliverer.flush()


class Reconciler:
    """Takes back the attempts of workers that died, in every worker process: an attempt whose lease
    expired is recorded as a lost attempt and scheduled again (or dead, if it was its last)."""

    def __init__(self, settings: Settings, store: Store, deliverer: Deliverer) -> None:
        self._config = settings.config
        self._store = store
        self._deliverer = deliverer
        self._interval_s = settings.config.worker.reconcile_interval_s

    async def run_forever(self) -> None:
        await every(self._interval_s, "reconciler", self.run_once)

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
        return fixed


async def trim(config: Config, store: Store) -> int:
    """Retention: deletes delivered and dead events that ended longer ago than their retention.
    Held events are never touched: they sit in their own index."""
    retention = config.retention
    now = now_ms()
    gone = 0
    for integration in [*config.integrations, *config.alert_sinks]:
        kept = ((EventState.DELIVERED, retention.delivered_days), (EventState.DEAD, retention.dead_days))
        for state, days in kept:
            cutoff = now - int(days * DAY_MS)
            while (removed := await store.trim(integration.name, state, cutoff)) > 0:
                gone += removed
    if gone:
        log.info("retention removed %d events", gone)
    return gone


async def _beat(store: Store, worker_id: str) -> None:
    beats = itertools.count()

    async def beat() -> None:
        await store.beat(worker_id, forget_silent=next(beats) % 30 == 0)

    await every(HEARTBEAT_S, "heartbeat", beat)


def arq_redis_settings(url: str) -> RedisSettings:
    """Reconnect and retry on a lost connection instead of letting a Redis blip end the worker."""
    settings = redis_url.arq_settings(url)
    settings.conn_timeout = 1
    settings.conn_retries = 3
    settings.conn_retry_delay = 1
    settings.retry_on_timeout = True
    settings.retry_on_error = [RedisConnectionError, RedisTimeoutError]
    settings.retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=5)
    return settings


async def run_worker(settings: Settings) -> None:
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
            await _run_once(settings, stopping=stopping)
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


async def _run_once(settings: Settings, *, stopping: asyncio.Event) -> None:
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

    async def retention(ctx: dict[str, Any]) -> int:
        return await trim(config, store)

    # arq runs the periodic work: retention once per tick across all workers (a unique cron job).
    worker = Worker(
        functions=[],
        cron_jobs=[
            cron(
                retention,
                name="retention",
                second=set(range(0, 60, config.retention.every_s)),
                run_at_startup=True,
                timeout=300,
            )
        ],
        queue_name=queue,
        redis_pool=pool,
        poll_delay=2.0,  # arq looks for its periodic jobs (retention) this often
        keep_result=0,
        job_serializer=orjson.dumps,
        job_deserializer=orjson.loads,
        log_results=False,
        handle_signals=True,
    )
    worker.on_stop = lambda _: stopping.set()
    for warning in await store.durability():
        log.warning("%s", warning)
    if moved := await store.migrate_due():
        log.info("moved %d scheduled attempts to the per-integration schedules", moved)
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    tasks = [
        asyncio.create_task(Pump(settings, store, deliverer).run_forever()),
        asyncio.create_task(Reconciler(settings, store, deliverer).run_forever()),
        asyncio.create_task(Drainer(settings, store, deliverer, alerts).run_forever()),
        asyncio.create_task(ReplayRunner(store).run_forever()),
        asyncio.create_task(_beat(store, worker_id)),
    ]
    log.info(
        "worker ready: %d integrations, concurrency %d", len(config.integrations), config.worker.concurrency
    )
    try:
        await worker.async_run()
    finally:
        # The pump hands back what it is sending (each attempt records itself as stopped) before
        # the HTTP session and the Redis pool close.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await store.forget_worker(worker_id)
        await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
        with contextlib.suppress(Exception):
            await worker.close()
        with contextlib.suppress(Exception):
            await pool.aclose(close_connection_pool=True)
        await sender.close()
