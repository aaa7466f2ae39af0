"""Bulk replay: every event that matches a filter is sent again, in the workers, at a bounded rate.

The API matches the events at once (from the state indexes) and keeps their ids in a list; the
answer carries the replay's id and the number matched. Workers then replay them, a few at a time,
at no more than REPLAY_RATE_PER_S, counting progress in the replay's hash; a cancel stops the rest.
Each id is replayed once per bulk replay: only delivered or dead events are replayed (REPLAY), and
an id is taken off the list before it is replayed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from gateway.errors import Conflict
from gateway.events import EventState, new_event_id, now_ms
from gateway.settings import Config
from gateway.shapes import ReplayFilter, ReplayJob
from gateway.store import Lock, Store, every

log = logging.getLogger("gateway.replays")

REPLAY_RATE_PER_S = 200
BATCH = 20
CHECK_INTERVAL_S = 2.0  # how often a worker looks for bulk replays to run (one Redis command)
IDEMPOTENCY_TTL_S = 86400
KEEP_DONE_S = 7 * 86400
LOCK_MS = 30_000  # one worker runs a replay; its lock is renewed after each batch


class ReplayJobs:
    """The API side: start, show and cancel bulk replays."""

    def __init__(self, config: Config, store: Store) -> None:
        self._config = config
        self._store = store

    async def start(self, selection: ReplayFilter, idempotency_key: str | None) -> ReplayJob:
        replay_id = new_event_id()
        if idempotency_key:
            first = await self._store.claim_replay_key(idempotency_key, replay_id, IDEMPOTENCY_TTL_S)
            if first is not None:
                found = await self.get(first) if first else None
                if found is None:
                    raise Conflict("a bulk replay with this Idempotency-Key is being started; ask again")
                return found
        names = (
            [selection.integration] if selection.integration else [i.name for i in self._config.integrations]
        )
        matched = await self._store.matching(names, selection.state, selection.since, selection.until)
        job = {
            "status": "running" if matched else "done",
            "matched": len(matched),
            "replayed": 0,
            "skipped": 0,
            "created_ms": now_ms(),
            "filter": selection.model_dump_json(),
        }
        await self._store.create_replay(replay_id, matched, job, KEEP_DONE_S)
        log.info("bulk replay %s started: %d events match %s", replay_id, len(matched), selection)
        found = await self.get(replay_id)
        assert found is not None
        return found

    async def get(self, replay_id: str) -> ReplayJob | None:
        f = await self._store.replay_job(replay_id)
        if f is None:
            return None
        fields = {k: v.decode() for k, v in f.items() if k != "filter"}
        return ReplayJob.model_validate(
            {**fields, "id": replay_id, "filter": ReplayFilter.model_validate_json(f["filter"])}
        )

    async def cancel(self, replay_id: str) -> ReplayJob | None:
        found = await self.get(replay_id)
        if found is None:
            return None
        if found.status == "running":
            await self._store.end_replay(replay_id, "cancelled", KEEP_DONE_S)
            log.info("bulk replay %s cancelled", replay_id)
        return await self.get(replay_id)


class ReplayRunner:
    """The worker side: takes ids off running replays and replays them, at a bounded rate."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._owner = f"{os.getpid()}-{id(self)}"

    async def run_forever(self) -> None:
        await every(CHECK_INTERVAL_S, "replays", self.run_once)

    async def run_once(self) -> None:
        for replay_id in await self._store.running_replays():
            lock = self._store.replay_lock(replay_id, self._owner, LOCK_MS)
            if not await self._store.lock(lock):
                continue
            try:
                await self._run(replay_id, lock)
            finally:
                await self._store.unlock(lock)

    async def _run(self, replay_id: str, lock: Lock) -> None:
        while True:
            started = time.monotonic()
            ids = await self._store.next_replay_ids(replay_id, BATCH)
            if ids is None:
                return
            if not ids:
                await self._store.end_replay(replay_id, "done", KEEP_DONE_S)
                log.info("bulk replay %s done", replay_id)
                return
            replayed = skipped = 0
            for event_id in ids:
                if await self._replay_one(event_id):
                    replayed += 1
                else:
                    skipped += 1
            await self._store.replay_progress(replay_id, replayed, skipped, lock)
            spare = len(ids) / REPLAY_RATE_PER_S - (time.monotonic() - started)
            if spare > 0:
                await asyncio.sleep(spare)

    async def _replay_one(self, event_id: str) -> bool:
        meta = await self._store.meta(event_id)
        if meta is None or meta[0] not in (EventState.DELIVERED, EventState.DEAD):
            return False
        _, attempt, integration, _ = meta
        reason = "bulk replay requested by an operator"
        return await self._store.replay(event_id, attempt, integration, reason) is not None
