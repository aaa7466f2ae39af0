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
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import Conflict
from gateway.events import EventState, new_event_id, now_ms
from gateway.settings import Config
from gateway.store import Store, every

log = logging.getLogger("gateway.replays")

REPLAY_RATE_PER_S = 200
BATCH = 20
CHECK_INTERVAL_S = 2.0  # how often a worker looks for bulk replays to run (one Redis command)
IDEMPOTENCY_TTL_S = 86400
KEEP_DONE_S = 7 * 86400
LOCK_MS = 30_000  # one worker runs a replay; its lock is renewed after each batch


@dataclass(frozen=True)
class Filter:
    integration: str | None
    state: EventState
    since: int | None
    until: int | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "integration": self.integration,
            "state": self.state.value,
            "since": self.since,
            "until": self.until,
        }


class ReplayJobs:
    """The API side: start, show and cancel bulk replays."""

    def __init__(self, config: Config, store: Store) -> None:
        self._config = config
        self._store = store

    async def start(self, selection: Filter, idempotency_key: str | None) -> dict[str, Any]:
        redis, keys = self._store.redis, self._store.keys
        replay_id = new_event_id()
        if idempotency_key:
            claimed = await redis.set(
                keys.replay_idempotency(idempotency_key), replay_id, nx=True, ex=IDEMPOTENCY_TTL_S
            )
            if not claimed:
                first = await redis.get(keys.replay_idempotency(idempotency_key))
                found = await self.get(first.decode()) if first else None
                if found is None:
                    raise Conflict("a bulk replay with this Idempotency-Key is being started; ask again")
                return found
        names = (
            [selection.integration] if selection.integration else [i.name for i in self._config.integrations]
        )
        low = "-inf" if selection.since is None else selection.since
        high = "+inf" if selection.until is None else selection.until
        async with redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.zrangebyscore(keys.state_index(name, selection.state), low, high)
            matched = [event_id for ids in await pipe.execute() for event_id in ids]
        async with redis.pipeline(transaction=True) as pipe:
            for k in range(0, len(matched), 1000):
                pipe.rpush(keys.replay_ids(replay_id), *matched[k : k + 1000])
            pipe.hset(
                keys.replay(replay_id),
                mapping={
                    "status": "running" if matched else "done",
                    "matched": len(matched),
                    "replayed": 0,
                    "skipped": 0,
                    "created_ms": now_ms(),
                    "filter": orjson.dumps(selection.as_dict()),
                },
            )
            if matched:
                pipe.sadd(keys.running_replays, replay_id)
            else:
                pipe.expire(keys.replay(replay_id), KEEP_DONE_S)
            await pipe.execute()
        log.info("bulk replay %s started: %d events match %s", replay_id, len(matched), selection.as_dict())
        found = await self.get(replay_id)
        assert found is not None
        return found

    async def get(self, replay_id: str) -> dict[str, Any] | None:
        fields = await self._store.redis.hgetall(self._store.keys.replay(replay_id))  # type: ignore[misc]
        if not fields:
            return None
        f = {k.decode(): v for k, v in fields.items()}
        return {
            "id": replay_id,
            "status": f["status"].decode(),
            "matched": int(f["matched"]),
            "replayed": int(f["replayed"]),
            "skipped": int(f["skipped"]),
            "created_ms": int(f["created_ms"]),
            "filter": orjson.loads(f["filter"]),
        }

    async def cancel(self, replay_id: str) -> dict[str, Any] | None:
        redis, keys = self._store.redis, self._store.keys
        found = await self.get(replay_id)
        if found is None:
            return None
        if found["status"] == "running":
            async with redis.pipeline(transaction=True) as pipe:
                pipe.hset(keys.replay(replay_id), "status", "cancelled")
                pipe.srem(keys.running_replays, replay_id)
                pipe.delete(keys.replay_ids(replay_id))
                pipe.expire(keys.replay(replay_id), KEEP_DONE_S)
                await pipe.execute()
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
        redis, keys = self._store.redis, self._store.keys
        for raw in await redis.smembers(keys.running_replays):  # type: ignore[misc]
            replay_id = raw.decode()
            lock = keys.replay_lock(replay_id)
            if not await self._store.lock(lock, self._owner, LOCK_MS):
                continue
            try:
                await self._run(replay_id, lock)
            finally:
                await self._store.unlock(lock, self._owner)

    async def _run(self, replay_id: str, lock: str) -> None:
        redis, keys = self._store.redis, self._store.keys
        while True:
            started = time.monotonic()
            status = await redis.hget(keys.replay(replay_id), "status")  # type: ignore[misc]
            if status != b"running":
                await redis.srem(keys.running_replays, replay_id)  # type: ignore[misc]
                return
            ids = await redis.lpop(keys.replay_ids(replay_id), BATCH)  # type: ignore[misc]
            if not ids:
                async with redis.pipeline(transaction=True) as pipe:
                    pipe.hset(keys.replay(replay_id), "status", "done")
                    pipe.srem(keys.running_replays, replay_id)
                    pipe.expire(keys.replay(replay_id), KEEP_DONE_S)
                    await pipe.execute()
                log.info("bulk replay %s done", replay_id)
                return
            replayed = skipped = 0
            for raw in ids:
                if await self._replay_one(raw.decode()):
                    replayed += 1
                else:
                    skipped += 1
            async with redis.pipeline(transaction=False) as pipe:
                pipe.hincrby(keys.replay(replay_id), "replayed", replayed)
                pipe.hincrby(keys.replay(replay_id), "skipped", skipped)
                pipe.pexpire(lock, LOCK_MS)
                await pipe.execute()
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
