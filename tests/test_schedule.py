"""The delivery schedule's scripts against a real Redis: CLAIM_DUE takes what is due in batches and
FINISH_MANY records many attempts in one call exactly as one call per attempt would (fencing,
failure counting, the pause in the middle of a batch, retries back on the schedule)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

import orjson
import redis
from redis.asyncio import Redis

from gateway.events import AttemptRecord, EventState, StoredRequest, new_event_id, now_ms
from gateway.keys import Keys
from gateway.store import NOT_COUNTED, Claimed, Count, Finish, Health, NewEvent, Store
from tests.conftest import KEYS, event_record

POLICIES = orjson.dumps({"crm": [4000, 100, 0, 1, 0]})  # lease ms, max in flight, rate, burst, ordered
DEFAULT = orjson.dumps([9000, 32, 0, 1, 0])
DUE = Keys("gw").due("crm")


async def claim(store: Store, limit: int) -> list[Claimed]:
    return (await store.claim_due(limit, POLICIES, DEFAULT))[0]


def run(redis_url: str, body: Callable[[Store], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        client = Redis.from_url(redis_url)
        try:
            return await body(Store(client, "gw"))
        finally:
            await client.aclose()

    return asyncio.run(main())


async def accept(store: Store, count: int, integration: str = "crm") -> list[str]:
    events = [
        NewEvent(new_event_id(), integration, "", StoredRequest("POST", "http://x/", [], b"%d" % n).pack())
        for n in range(count)
    ]
    return [event_id for event_id, _ in await store.accept(events, 60)]


def record(n: int, outcome: EventState, status: int | None = 200) -> AttemptRecord:
    return AttemptRecord(
        n=n,
        at_ms=now_ms(),
        latency_ms=1.0,
        status=status,
        error=None,
        detail="",
        outcome=outcome.value,
        body="",
    )


def failed(claimed: Claimed, threshold: int, due_ms: int = 0) -> Finish:
    health = Health(Count.FAILURE, threshold, "HTTP 500", 30.0)
    return Finish(
        claimed.event_id,
        claimed.attempt,
        EventState.RETRYING,
        record(claimed.attempt, EventState.RETRYING, 500),
        health,
        due_ms,
    )


def delivered(claimed: Claimed) -> Finish:
    state = EventState.DELIVERED
    return Finish(
        claimed.event_id, claimed.attempt, state, record(claimed.attempt, state), Health(Count.SUCCESS)
    )


def zmembers(rdb: redis.Redis, key: str) -> list[str]:
    return [m.decode() for m in cast(list[bytes], rdb.zrange(key, 0, -1))]


def hget(rdb: redis.Redis, key: str, field: str) -> bytes | None:
    return cast(bytes | None, rdb.hget(key, field))


def test_claim_due_takes_a_batch_in_due_order_and_leaves_the_rest(redis_url: str, rdb: redis.Redis) -> None:
    async def body(store: Store) -> tuple[list[str], list[Claimed], list[Claimed]]:
        ids = await accept(store, 5)
        first = await claim(store, 3)
        second = await claim(store, 10)
        return ids, first, second

    ids, first, second = run(redis_url, body)
    # Events due in the same millisecond come in any order; each is taken once.
    assert len(first) == 3 and sorted(c.event_id for c in first + second) == sorted(ids)
    by_id = {c.event_id: c for c in first + second}
    assert all((c.attempt, c.integration) == (1, "crm") for c in by_id.values())
    assert [StoredRequest.unpack(by_id[i].request_blob).body for i in ids] == [b"0", b"1", b"2", b"3", b"4"]
    assert rdb.zcard(DUE) == 0
    assert (
        sorted(zmembers(rdb, KEYS.state_index("crm", "in_flight"))) == sorted(ids)
        and rdb.zcard(KEYS.state_index("crm", "pending")) == 0
    )
    leases = dict(cast(list[tuple[bytes, float]], rdb.zrange(KEYS.lease, 0, -1, withscores=True)))
    assert all(now_ms() + 3000 < score <= now_ms() + 4000 for score in leases.values())
    assert {hget(rdb, KEYS.event(i), "s") for i in ids} == {b"in_flight"}


def test_finish_many_counts_failures_in_order_and_pauses_in_the_middle_of_a_batch(
    redis_url: str, rdb: redis.Redis
) -> None:
    """Five failures against a threshold of three: the third pauses the integration and its retry,
    like the two after it, is held (in arrival order) instead of scheduled; the warnings and the
    pause are each signalled once, by the attempt that crossed them."""

    async def body(store: Store) -> tuple[list[str], list[Any]]:
        await accept(store, 5)
        claimed = await claim(store, 10)
        results = await store.finish_many([failed(c, 3, now_ms() + 60_000) for c in claimed])
        return [c.event_id for c in claimed], results

    ids, results = run(redis_url, body)
    assert [r.consecutive_failures for r in results] == [1, 2, 3, 4, 5]
    assert [r.signals for r in results] == [(), ("warn50",), ("warn90", "paused"), (), ()]
    assert [r.state for r in results] == [EventState.RETRYING] * 2 + [EventState.HELD] * 3
    assert [r.paused for r in results] == [False, False, True, True, True]
    health = {
        k.decode(): v.decode()
        for k, v in cast(dict[bytes, bytes], rdb.hgetall(KEYS.integration("crm"))).items()
    }
    assert health["state"] == "paused" and health["fails"] == "5" and health["last_error"] == "HTTP 500"
    assert sorted(zmembers(rdb, DUE)) == sorted(ids[:2])  # the retries before the pause
    assert sorted(zmembers(rdb, KEYS.state_index("crm", "held"))) == sorted(ids[2:])
    assert rdb.zcard(KEYS.lease) == 0 and rdb.zcard(KEYS.state_index("crm", "in_flight")) == 0
    assert hget(rdb, KEYS.event(ids[0]), "n") == b"2"
    assert [
        orjson.loads(a)["status"] for a in cast(list[bytes], rdb.lrange(KEYS.attempts(ids[4]), 0, -1))
    ] == [500]
    assert (
        hget(rdb, KEYS.metric("attempts"), "crm|retrying") == b"2"
        and hget(rdb, KEYS.metric("attempts"), "crm|held") == b"3"
    )


def test_finish_many_is_fenced_per_item_and_a_success_resets_the_count(
    redis_url: str, rdb: redis.Redis
) -> None:
    async def body(store: Store) -> tuple[list[str], list[Any], list[Any]]:
        await accept(store, 3)
        a, b, c = await claim(store, 10)
        ids = [a.event_id, b.event_id, c.event_id]
        first = await store.finish_many([failed(a, 100), delivered(b)])
        # a again (already finished), b with a wrong attempt number, then c: only c counts.
        stale_b = Finish(
            b.event_id, 7, EventState.DELIVERED, record(7, EventState.DELIVERED), Health(Count.SUCCESS)
        )
        second = await store.finish_many([failed(a, 100), stale_b, failed(c, 100)])
        return ids, first, second

    ids, first, second = run(redis_url, body)
    assert [r.consecutive_failures for r in first] == [1, 0]
    assert first[1].state is EventState.DELIVERED
    assert second[0] is None and second[1] is None
    assert second[2].consecutive_failures == 1  # the success in between reset the count
    assert hget(rdb, KEYS.integration("crm"), "fails") == b"1"
    assert hget(rdb, KEYS.event(ids[1]), "s") == b"delivered" and rdb.llen(KEYS.attempts(ids[0])) == 1
    assert zmembers(rdb, KEYS.state_index("crm", "delivered")) == [ids[1]]


def test_due_retries_wait_their_time_and_paused_integrations_hold_what_comes_due(
    redis_url: str, rdb: redis.Redis
) -> None:
    async def body(store: Store) -> tuple[list[str], list[Claimed], list[Claimed], list[Claimed]]:
        await accept(store, 2)
        a, b = await claim(store, 10)
        ids = [a.event_id, b.event_id]
        await store.finish_many([failed(a, 100, now_ms() + 60_000), failed(b, 100, now_ms() - 1)])
        retried = await claim(store, 10)  # only b is due
        await store.finish_many([failed(retried[0], 100, now_ms() - 1)])
        await store.set_state("crm", "pause", manual=True)
        held = await claim(store, 10)  # b is due again, but crm is paused
        more = await accept(store, 1)
        return ids + more, retried, held, await claim(store, 10)

    ids, retried, held, after = run(redis_url, body)
    assert [(c.event_id, c.attempt) for c in retried] == [(ids[1], 2)]
    assert held == [] and after == []
    assert zmembers(rdb, DUE) == [ids[0]]
    assert zmembers(rdb, KEYS.state_index("crm", "held")) == [ids[1], ids[2]]
    assert hget(rdb, KEYS.event(ids[1]), "s") == b"held"


def test_the_reconciler_finishes_only_attempts_whose_lease_expired(redis_url: str, rdb: redis.Redis) -> None:
    async def body(store: Store) -> list[Any]:
        await accept(store, 2)
        live, lost = await claim(store, 10)
        await store.redis.zadd(store.keys.lease, {lost.event_id: now_ms() - 1})

        def expired(c: Claimed) -> Finish:
            state = EventState.RETRYING
            stopped = record(c.attempt, state, None)
            due = now_ms()
            return Finish(c.event_id, c.attempt, state, stopped, NOT_COUNTED, due, only_if_lease_expired=True)

        return await store.finish_many([expired(live), expired(lost)])

    live, lost = run(redis_url, body)
    assert live is None
    assert lost.state is EventState.RETRYING and lost.consecutive_failures == 0
    assert (
        hget(rdb, KEYS.integration("crm"), "fails") is None
    )  # a lost worker says nothing about the endpoint


def test_drained_events_lost_with_their_worker_go_back_to_their_places(
    redis_url: str, rdb: redis.Redis
) -> None:
    """A worker that dies while it drains leaves the events it took in flight; when their leases
    expire they return to the held queue where they were, not to the schedule behind newer ones."""

    async def body(store: Store) -> tuple[list[tuple[bytes, float]], list[Any]]:
        await store.set_state("crm", "pause", manual=True)
        await accept(store, 4)
        held = cast(
            list[tuple[bytes, float]],
            await store.redis.zrange(KEYS.state_index("crm", "held"), 0, -1, withscores=True),
        )
        await store.set_state("crm", "resume", manual=True)
        taken = await store.take_held("crm", 2, 4000, probe=False)
        await store.redis.zadd(store.keys.lease, {event_id: now_ms() - 1 for event_id, *_ in taken})
        lost = [
            Finish(
                event_id,
                n,
                EventState.RETRYING,
                record(n, EventState.RETRYING, None),
                NOT_COUNTED,
                now_ms(),
                only_if_lease_expired=True,
            )
            for event_id, n, _, _ in taken
        ]
        return held, await store.finish_many(lost)

    held, finished = run(redis_url, body)
    assert [f.state for f in finished] == [EventState.HELD, EventState.HELD]
    assert (
        cast(list[tuple[bytes, float]], rdb.zrange(KEYS.state_index("crm", "held"), 0, -1, withscores=True))
        == held
    )
    assert rdb.zcard(DUE) == 0


def test_a_schedule_from_before_per_integration_schedules_is_moved_not_lost(
    redis_url: str, rdb: redis.Redis
) -> None:
    """An upgrade finds the one schedule of every integration (P:due, id -> due ms): the worker
    moves its entries into the integrations' own, and they are claimed as before."""

    async def body(store: Store) -> tuple[int, list[Claimed], int]:
        ids = await accept(store, 3)
        # as the previous gateway kept them: the per-integration schedule empty, P:due holding all
        rdb.delete(DUE, store.keys.ready)
        rdb.zadd(f"{store.keys.prefix}:due", {event_id: now_ms() - 5 for event_id in ids})
        moved = await store.migrate_due()
        return moved, await claim(store, 10), await store.migrate_due()

    moved, claimed, again = run(redis_url, body)
    assert (moved, len(claimed), again) == (3, 3, 0)
    assert rdb.exists(f"{KEYS.prefix}:due") == 0  # the old layout's one schedule, gone


def test_an_ordered_integration_takes_one_batch_in_arrival_order_and_listings_keep_it(
    redis_url: str, rdb: redis.Redis
) -> None:
    """One ACCEPT call shares one millisecond among its events: their received scores still follow
    their order in the call (an id's random part must not decide), for the ordered integration's
    one-at-a-time claims and for the listings, whose `until` takes its whole millisecond."""
    ordered = orjson.dumps({"crm": [4000, 100, 0, 1, 1]})

    async def body(store: Store) -> tuple[list[str], list[str], list[str], list[str], list[str]]:
        ids = await accept(store, 40)
        sent: list[str] = []
        while len(sent) < len(ids):
            (one,) = (await store.claim_due(10, ordered, DEFAULT))[0]  # one at a time, as ordered
            sent.append(one.event_id)
            await store.finish_many([delivered(one)])
        received = int(float(event_record(rdb, ids[0])["t"]))
        listed, _ = await store.list_events(["crm"], ["delivered"], received, received, 100, None)
        late = await accept(store, 3)  # another call: after all of them, whatever its millisecond
        pending = [
            i.decode() for i in cast(list[bytes], rdb.zrange(KEYS.state_index("crm", "pending"), 0, -1))
        ]
        return ids, sent, [e["id"] for e in listed], late, pending

    ids, sent, listed, late, pending = run(redis_url, body)
    assert sent == ids
    assert listed == ids[::-1]  # newest first, all of them within `until`
    assert pending == late
    t = [float(event_record(rdb, i)["t"]) for i in ids]
    assert t == sorted(set(t)) and int(t[-1]) == int(t[0])  # strictly rising within its millisecond


def test_an_attempt_whose_retry_is_held_says_held_in_its_record_as_the_metrics_count_it(
    redis_url: str, rdb: redis.Redis
) -> None:
    """A failed attempt of a paused integration is held, not scheduled: its record in the attempt
    log says "held" (with no retry_in_s), as gateway_attempts counts it; the chaos run found the
    log saying "retrying" while /metrics said held. A retry before the pause keeps its record."""

    async def body(store: Store) -> list[str]:
        await accept(store, 2)
        first, second = await claim(store, 10)
        retry = failed(first, 100, now_ms() + 60_000)
        retry.record["retry_in_s"] = 60.0
        await store.finish_many([retry])
        await store.set_state("crm", "pause", manual=True)
        held = failed(second, 100, now_ms() + 60_000)
        held.record["retry_in_s"] = 60.0
        held.record["body"] = '{"outcome":"retrying"}'  # an endpoint's answer is kept as it came
        await store.finish_many([held])
        return [first.event_id, second.event_id]

    ids = run(redis_url, body)
    logs = [
        [orjson.loads(a) for a in cast(list[bytes], rdb.lrange(KEYS.attempts(event_id), 0, -1))]
        for event_id in ids
    ]
    assert [(a["outcome"], a.get("retry_in_s")) for a in logs[0]] == [("retrying", 60.0)]
    assert [(a["outcome"], a.get("retry_in_s")) for a in logs[1]] == [("held", None)]
    assert logs[1][0]["body"] == '{"outcome":"retrying"}' and logs[1][0]["status"] == 500
    assert hget(rdb, KEYS.event(ids[1]), "s") == b"held"
    assert (
        hget(rdb, KEYS.metric("attempts"), "crm|retrying") == b"1"
        and hget(rdb, KEYS.metric("attempts"), "crm|held") == b"1"
    )


def test_leased_counts_the_attempts_in_flight_until_they_are_recorded(redis_url: str) -> None:
    """Store.leased: what the chaos run reads to prove nothing is left in flight."""

    async def body(store: Store) -> list[int]:
        await accept(store, 3)
        before = await store.leased()
        first, *rest = await claim(store, 10)
        claimed = await store.leased()
        await store.finish_many([delivered(first)])
        return [before, claimed, await store.leased(), len(rest)]

    assert run(redis_url, body) == [0, 3, 2, 2]
