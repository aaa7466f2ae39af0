"""GET /metrics: Prometheus text, with figures that cover every process on every machine.

Counters live in Redis (the Lua scripts that change state count as they go, see `gateway.keys`),
and gauges are read from the state indexes, so one scrape of any API process shows the whole
cluster, at one pipelined round trip whatever the number of events. Every figure is declared in
`collect` below: a feature adds its families there. Labels are integration names and small fixed
sets (states, outcomes, kinds, reasons), never event ids or URLs.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from gateway.events import now_ms
from gateway.settings import Config
from gateway.store import COUNTED_STATES, LATENCY_BUCKETS, Store

log = logging.getLogger("gateway.metrics")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _pairs(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


# The counter hashes a scrape reads (see the layout in `gateway.keys`), in this order.
METRIC_HASHES = (
    "accepted",
    "attempts",
    "latency",
    "latency_sum",
    "alerts",
    "refused",
    "proxy",
    "proxy_latency",
    "proxy_latency_sum",
    "wait",
    "wait_sum",
)
PROXY_CACHE = ("miss", "hit", "stale")


def _buckets(counts: dict[str, str], name: str) -> list[tuple[str, float]]:
    """A histogram's cumulative buckets from per-bucket counts kept as `integration|index`."""
    cumulative, buckets = 0.0, []
    for index, bound in enumerate(LATENCY_BUCKETS):
        cumulative += float(counts.get(f"{name}|{index}", 0))
        buckets.append((str(bound), cumulative))
    cumulative += float(counts.get(f"{name}|{len(LATENCY_BUCKETS)}", 0))
    buckets.append(("+Inf", cumulative))
    return buckets


class _Snapshot(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


class Refusals:
    """Inbound requests refused by the API process, counted here and added to Redis each second
    (a 503 happens exactly when Redis cannot take the count)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._pending: Counter[str] = Counter()

    def add(self, reason: str) -> None:
        self._pending[reason] += 1

    async def flush_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if not self._pending:
                continue
            taken, self._pending = self._pending, Counter()
            try:
                await self._store.count("refused", taken)
            except (RedisError, OSError):
                self._pending.update(taken)


class Metrics:
    def __init__(self, config: Config, store: Store) -> None:
        self._config = config
        self._store = store

    async def endpoint(self, request: Request) -> Response:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Snapshot(await self.collect()))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE)

    async def collect(self) -> list[Metric]:
        integrations = self._config.integrations
        replies = await self._store.metrics(METRIC_HASHES, [i.name for i in integrations])
        hashes = len(METRIC_HASHES)
        (
            accepted,
            attempts,
            latency,
            latency_sum,
            alerts,
            refused,
            proxy,
            proxy_latency,
            proxy_sum,
            wait,
            wait_sum,
        ) = (_pairs(r) for r in replies[:hashes])
        workers_f = GaugeMetricFamily("gateway_workers_live", "Workers with a heartbeat in the last 10 s.")
        workers_f.add_metric([], float(replies[hashes]))
        per_integration = replies[hashes + 1 :]
        step = len(COUNTED_STATES) + 2
        now = now_ms()

        accepted_f = CounterMetricFamily(
            "gateway_events_accepted", "Events accepted from the helpdesk.", labels=["integration", "mode"]
        )
        attempts_f = CounterMetricFamily(
            "gateway_attempts",
            "Finished delivery attempts by what became of the event (delivered, retrying, held, dead).",
            labels=["integration", "outcome"],
        )
        latency_f = HistogramMetricFamily(
            "gateway_attempt_duration_seconds", "Duration of delivery attempts.", labels=["integration"]
        )
        answers_f = CounterMetricFamily(
            "gateway_proxy_answers",
            "Proxy mode: answers to the helpdesk by how they were served (miss: the upstream's own; "
            "hit: the copy, within fresh_ttl_s; stale: the last good answer, the upstream failing).",
            labels=["integration", "cache"],
        )
        proxy_latency_f = HistogramMetricFamily(
            "gateway_proxy_duration_seconds",
            "Proxy mode: time from the helpdesk's request to the gateway's answer.",
            labels=["integration"],
        )
        events_f = GaugeMetricFamily(
            "gateway_events", "Events by state now.", labels=["integration", "state"]
        )
        oldest_f = GaugeMetricFamily(
            "gateway_oldest_pending_age_seconds",
            "Age of the oldest pending event (0 when none is pending).",
            labels=["integration"],
        )
        paused_f = GaugeMetricFamily("gateway_integration_paused", "1 while paused.", labels=["integration"])
        fails_f = GaugeMetricFamily(
            "gateway_consecutive_failures", "Consecutive failed attempts.", labels=["integration"]
        )
        wait_f = HistogramMetricFamily(
            "gateway_schedule_wait_seconds",
            "Time from an attempt's due time to a worker taking it (waiting for a slot, a rate token, "
            "a Retry-After, or a worker).",
            labels=["integration"],
        )
        slots_f = GaugeMetricFamily(
            "gateway_max_in_flight",
            "Attempts the integration may have in flight at once.",
            labels=["integration"],
        )
        rate_f = GaugeMetricFamily(
            "gateway_rate_limit_per_second",
            "The integration's rate limit, where one is set.",
            labels=["integration"],
        )
        waiting_f = GaugeMetricFamily(
            "gateway_integration_waiting_seconds",
            "Seconds left of a Retry-After wait that holds every event of the integration (0: none).",
            labels=["integration"],
        )
        alerts_f = CounterMetricFamily("gateway_alerts_sent", "Alerts sent, by kind.", labels=["kind"])
        refused_f = CounterMetricFamily(
            "gateway_inbound_refused",
            "Helpdesk requests refused, by HTTP status (client_closed: the helpdesk hung up).",
            labels=["reason"],
        )

        for k, integration in enumerate(integrations):
            name = integration.name
            chunk = per_integration[k * step : (k + 1) * step]
            accepted_f.add_metric([name, integration.mode], float(accepted.get(name, 0)))
            for outcome in ("delivered", "retrying", "held", "dead"):
                attempts_f.add_metric([name, outcome], float(attempts.get(f"{name}|{outcome}", 0)))
            latency_f.add_metric([name], _buckets(latency, name), float(latency_sum.get(name, 0)))
            if integration.mode == "proxy":
                for cache in PROXY_CACHE:
                    answers_f.add_metric([name, cache], float(proxy.get(f"{name}|{cache}", 0)))
                proxy_latency_f.add_metric(
                    [name], _buckets(proxy_latency, name), float(proxy_sum.get(name, 0))
                )
            for state, count in zip(COUNTED_STATES, chunk[: len(COUNTED_STATES)], strict=True):
                events_f.add_metric([name, state.value], float(count))
            oldest = chunk[len(COUNTED_STATES)]
            oldest_f.add_metric([name], max(0.0, (now - oldest[0][1]) / 1000) if oldest else 0.0)
            state, fails, wait_until = chunk[-1]
            paused_f.add_metric([name], 1.0 if state == b"paused" else 0.0)
            fails_f.add_metric([name], float(fails or 0))
            waiting_f.add_metric([name], max(0.0, (float(wait_until or 0) - now) / 1000))
            wait_f.add_metric([name], _buckets(wait, name), float(wait_sum.get(name, 0)))
            slots_f.add_metric([name], float(integration.slots))
            if integration.rate_limit_per_s is not None:
                rate_f.add_metric([name], integration.rate_limit_per_s)
        for kind, n in sorted(alerts.items()):
            alerts_f.add_metric([kind], float(n))
        for reason, n in sorted(refused.items()):
            refused_f.add_metric([reason], float(n))
        return [
            accepted_f,
            attempts_f,
            latency_f,
            answers_f,
            proxy_latency_f,
            events_f,
            oldest_f,
            paused_f,
            fails_f,
            wait_f,
            slots_f,
            rate_f,
            waiting_f,
            alerts_f,
            refused_f,
            workers_f,
        ]
