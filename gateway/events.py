"""Events: their states, ids, and the request each one carries."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, NotRequired

import orjson
from pydantic import ConfigDict, with_config
from typing_extensions import TypedDict  # pydantic reads it on Python 3.11 (the admin API's Event)


class EventState(StrEnum):
    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    RETRYING = "retrying"
    HELD = "held"
    DELIVERED = "delivered"
    DEAD = "dead"


TERMINAL = frozenset({EventState.DELIVERED, EventState.DEAD})
DUE = frozenset({EventState.PENDING, EventState.RETRYING})


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_event_id(at_ms: int | None = None) -> str:
    """32 hex digits: 48 bits of milliseconds (so ids sort by creation time), then 80 random bits.

    Unique, not secret: ids are shown to the helpdesk and the endpoint anyway, so the fast
    Mersenne Twister (seeded from the OS per process) serves; os.urandom cost 5 us per id.
    """
    ms = now_ms() if at_ms is None else at_ms
    return f"{ms:012x}{random.getrandbits(80):020x}"


@dataclass(frozen=True, slots=True)
class StoredRequest:
    """The helpdesk's request as it will be sent upstream (before configured headers are added)."""

    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes

    def pack(self, headers: list[tuple[str, str]] | None = None) -> bytes:
        """As stored in Redis; with `headers`, those in place of its own (sealed ones, say)."""
        # JSON never contains a raw newline, so the first one separates the head from the body.
        head = orjson.dumps(
            {"m": self.method, "u": self.url, "h": self.headers if headers is None else headers}
        )
        return head + b"\n" + self.body

    @classmethod
    def unpack(cls, blob: bytes) -> StoredRequest:
        head, _, body = blob.partition(b"\n")
        meta = orjson.loads(head)
        return cls(meta["m"], meta["u"], [(k, v) for k, v in meta["h"]], body)


Answered = Literal["fresh", "hit", "stale", "error", "queued"]


@with_config(ConfigDict(extra="forbid"))
class AttemptRecord(TypedDict):
    """One delivery attempt, as kept in the event's attempt log and shown by the admin API."""

    n: int
    at_ms: int
    latency_ms: float
    status: int | None
    error: str | None
    detail: str
    outcome: str
    body: str
    retry_in_s: NotRequired[float]
    answered: NotRequired[Answered]  # proxy mode: how the helpdesk was answered
