"""The chaos run, short: 45 s of steady load on a flapping endpoint while two workers, the API
and Redis (append-only file, fsync always) are killed with SIGKILL and started again, then the
drain and the ledger's checks (see benchmarks/chaos.py): no acknowledged event lost or stuck, the
admin API, /metrics and the endpoint's log in agreement."""

from __future__ import annotations

import asyncio
import random

import pytest

from benchmarks._common import harness
from benchmarks.chaos import ENDPOINT_FAULTS, PROCESS_FAULTS, chaos
from tests.conftest import server_binary


@pytest.mark.timeout(240)
def test_chaos_loses_no_acknowledged_event() -> None:
    seed = random.randrange(1 << 31)
    with harness("gateway-test-chaos-") as h:
        verdict = asyncio.run(
            chaos(
                h,
                seconds=45,
                rate=20,
                fault_every_s=2.5,
                drain_s=60,
                retry_s=20,
                seed=seed,
                server=server_binary(),
            )
        )
        logs = {name: h.log(name)[-3000:] for name in ("api", "worker0", "worker1", "redis")}
    assert verdict.problems == [], (seed, logs)
    assert verdict.lost == 0 and verdict.stuck == 0
    assert verdict.acked >= 0.95 * verdict.posted > 0
    assert verdict.delivered + verdict.dead == verdict.events >= verdict.acked
    # Every kind of fault happened, so the run proved something about each.
    assert set(PROCESS_FAULTS) | (set(ENDPOINT_FAULTS) - {"ok"}) <= set(verdict.faults), verdict.faults
    assert verdict.attempts > verdict.acked
