"""Draining held events after a resume, and probing a paused integration.

Held events of one integration are sent by one worker at a time (a lock in Redis), oldest first,
one after the other, at no more than the integration's `drain_rate_per_s`: the endpoint that just
came back gets them in arrival order and at a bounded rate, never all at once. New events wait
behind them (ACCEPT holds them while any are held). A drained event that fails goes back to its
place and the drain waits a backoff; enough failures pause the integration again.

While an integration is paused (not by hand, and with `probe` on), one held event is sent as a
probe each cool-down; success resumes the integration, failure doubles the cool-down up to
`probe_cooldown_max_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from gateway.alerts import AlertKind, Alerts
from gateway.delivery import Result, Verdict, backoff_s
from gateway.events import EventState, new_event_id, now_ms
from gateway.settings import Integration, Settings
from gateway.store import Finished, Lock, Store, every

if TYPE_CHECKING:
    from gateway.worker import Deliverer

log = logging.getLogger("gateway.drain")

# How often a worker looks for integrations to drain or probe: a drain starts this long after a
# resume at most (one Redis command per check, whatever the number of integrations).
CHECK_INTERVAL_S = 1.0
MAX_BATCH = 64
RECORD_GROUP = 16  # delivered attempts recorded per round trip during a drain


def batch_size(integration: Integration) -> int:
    """Held events taken at once: a tenth of a second's worth at the drain rate, 1 to MAX_BATCH."""
    return max(1, min(MAX_BATCH, int(integration.drain_rate_per_s / 10)))


class Drainer:
    def __init__(self, settings: Settings, store: Store, deliverer: Deliverer, alerts: Alerts) -> None:
        self._integrations = [i for i in settings.config.integrations if not i.internal]
        self._by_name = {i.name: i for i in self._integrations}
        self._store = store
        self._deliverer = deliverer
        self._alerts = alerts
        self._owner = f"{os.getpid()}-{id(self)}"
        self._running: dict[str, asyncio.Task[None]] = {}
        self._failures: dict[str, int] = {}

    async def run_forever(self) -> None:
        try:
            await every(CHECK_INTERVAL_S, "drainer", self.run_once)
        finally:
            for task in self._running.values():
                task.cancel()

    async def run_once(self) -> None:
        """Starts a drain or probe task for each integration that is paused (a probe is due) or
        drains what it held. Only those are read (P:attention), so an idle worker's check costs
        Redis one command whatever the number of integrations."""
        if not self._integrations:
            return
        now = now_ms()
        for name, paused, manual, probe_ms, draining in await self._store.attention():
            integration = self._by_name.get(name)
            if integration is None or name in self._running:
                continue
            if paused and (manual or not integration.probe or probe_ms > now):
                continue
            if not paused and not draining:
                continue
            task = asyncio.create_task(self._locked(integration, probe=paused))
            self._running[name] = task
            task.add_done_callback(self._forget(name))

    def _batch_lease_ms(self, integration: Integration) -> int:
        """The events of a batch are sent one after the other: the last one's lease (and the drain
        lock) must cover the whole batch, or the reconciler would take it back while it waits."""
        return self._deliverer.lease_ms(integration) + int(integration.timeout_s * 1000) * (
            batch_size(integration) - 1
        )

    def _forget(self, name: str) -> Callable[[asyncio.Task[None]], None]:
        def forget(task: asyncio.Task[None]) -> None:
            self._running.pop(name, None)

        return forget

    async def _locked(self, integration: Integration, *, probe: bool) -> None:
        lock = self._store.drain_lock(integration.name, self._owner, self._batch_lease_ms(integration) + 5000)
        if not await self._store.lock(lock):
            return
        try:
            if probe and not await self._probe(integration):
                return
            await self._drain(integration, lock)
        except (RedisError, OSError) as exc:
            log.warning("drain of %s stopped: Redis unavailable (%s)", integration.name, exc)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await self._store.unlock(lock)

    async def _send(
        self, name: str, event_id: str, attempt: int, received_ms: int, blob: bytes
    ) -> tuple[Result, Verdict, float, int]:
        """Sends a held event: (result, verdict, wait before a retry, start ms).

        A held event is never dropped for its retry budget: a failure that a later attempt could
        fix puts it back in its place, whatever its attempt count or age; only an answer that no
        retry can change (a 4xx, a blocked address) makes it dead.
        """
        at = now_ms()
        result, verdict, wait_s = await self._deliverer.attempt(event_id, attempt, name, received_ms, blob)
        if verdict is Verdict.DEAD and result.retryable:
            verdict = Verdict.RETRY
        return result, verdict, wait_s, at

    async def _probe(self, integration: Integration) -> bool:
        """Sends the oldest held event (in proxy mode, when none is held, the last request that
        failed); True when it was delivered and the integration resumed."""
        name = integration.name
        taken = await self._store.take_held(name, 1, self._deliverer.lease_ms(integration), probe=True)
        if not taken:
            return integration.mode == "proxy" and await self._probe_request(integration)
        event_id, attempt, received_ms, blob = taken[0]
        try:
            result, verdict, wait_s, at = await self._send(name, event_id, attempt, received_ms, blob)
        except asyncio.CancelledError:
            await self._hand_back(name, [(event_id, attempt)])
            raise
        await self._deliverer.record(
            event_id, attempt, name, result, verdict, wait_s, at, retry_state=EventState.HELD
        )
        return await self._probed(integration, verdict is Verdict.DELIVERED, f"event {event_id}")

    async def _probe_request(self, integration: Integration) -> bool:
        """Sends the last proxied request that failed again (a new webhook-id: it is no event)."""
        blob = await self._store.probe_request(integration.name)
        if blob is None:
            return False
        result, _, _ = await self._deliverer.attempt(new_event_id(), 1, integration.name, now_ms(), blob)
        return await self._probed(integration, result.ok, "the last failed request")

    async def _probed(self, integration: Integration, delivered: bool, what: str) -> bool:
        """Resumes the integration after a probe that was delivered, or waits a longer cool-down."""
        name = integration.name
        if delivered:
            before, held = await self._store.set_state(name, "resume", manual=False)
            if before == "paused":
                log.info("probe of %s delivered %s: resuming", name, what)
                await self._alerts.send(
                    AlertKind.RESUMED, name, consecutive_failures=0, held=held, reason="a probe was delivered"
                )
            return True
        health = await self._store.health(name)
        cooldown = min(
            float(health.get("cooldown_s", integration.probe_cooldown_s)) * 2,
            integration.probe_cooldown_max_s,
        )
        await self._store.probe_failed(name, cooldown)
        log.info("probe of %s failed; next probe in %.1f s", name, cooldown)
        return False

    async def _hand_back(self, name: str, taken: list[tuple[str, int]]) -> None:
        """Puts events taken but not (or not wholly) sent back in their places, held."""
        with contextlib.suppress(RedisError, OSError):
            await asyncio.shield(self._store.return_held(name, taken))

    async def _drain(self, integration: Integration, lock: Lock) -> None:
        name = integration.name
        batch = batch_size(integration)
        lease_ms = self._batch_lease_ms(integration)
        interval_s = batch / integration.drain_rate_per_s
        while True:
            started = time.monotonic()
            taken = await self._store.take_held(name, batch, lease_ms, probe=False)
            if not taken:
                return
            # Sends go one after the other (that is the order the endpoint sees). Their records go
            # in groups, one round trip each, while the next sends go on; each group's answer
            # tells whether the integration was paused meanwhile (by hand, or by failures).
            groups: list[asyncio.Task[list[Finished | None]]] = []
            group: list[tuple[str, int, Result, Verdict, int]] = []
            sent = 0
            failures = 0
            try:
                for event_id, attempt, received_ms, blob in taken:
                    if any(g.done() and any(f is not None and f.paused for f in g.result()) for g in groups):
                        break
                    result, verdict, wait_s, at = await self._send(name, event_id, attempt, received_ms, blob)
                    sent += 1
                    if verdict is not Verdict.RETRY:
                        self._failures.pop(name, None)
                        group.append((event_id, attempt, result, verdict, at))
                        if len(group) >= RECORD_GROUP:
                            groups.append(asyncio.create_task(self._deliverer.record_many(name, group)))
                            group = []
                        continue
                    await self._deliverer.record(
                        event_id, attempt, name, result, verdict, wait_s, at, retry_state=EventState.HELD
                    )
                    failures = self._failures[name] = self._failures.get(name, 0) + 1
                    break
            except asyncio.CancelledError:
                # The worker is stopping: what was not sent goes back, the one being sent too;
                # what was sent is recorded.
                await self._hand_back(name, [(e, n) for e, n, _, _ in taken[sent:]])
                if group:
                    await asyncio.shield(self._deliverer.record_many(name, group))
                raise
            await self._hand_back(name, [(e, n) for e, n, _, _ in taken[sent:]])
            if group:
                groups.append(asyncio.create_task(self._deliverer.record_many(name, group)))
            results = [f for g in await asyncio.gather(*groups) for f in g]
            if failures:
                # Keep the order: the rest went back to their places; wait before trying again.
                await asyncio.sleep(backoff_s(integration.retry, failures))
            if any(f is not None and f.paused for f in results):
                return
            await self._store.renew(lock)
            spare = interval_s - (time.monotonic() - started)
            if spare > 0:
                await asyncio.sleep(spare)
