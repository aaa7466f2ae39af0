"""Alerts: an integration nears its failure threshold, is paused, or resumes.

Every alert is a log line, and for each [[alerts]] sink an event of that sink's internal
integration ("_alert-N"), so it is kept in Redis and delivered with retries like any other event.
"""

from __future__ import annotations

import logging
import time
from enum import StrEnum
from typing import Any

import orjson
from redis.exceptions import RedisError

from gateway.events import StoredRequest, new_event_id
from gateway.settings import Config
from gateway.store import Finished, NewEvent, Store

log = logging.getLogger("gateway.alerts")
IDEMPOTENCY_TTL_S = 86400


class AlertKind(StrEnum):
    WARNING_50 = "integration.warning"
    WARNING_90 = "integration.critical"
    PAUSED = "integration.paused"
    RESUMED = "integration.resumed"


SIGNALS = {"warn50": AlertKind.WARNING_50, "warn90": AlertKind.WARNING_90, "paused": AlertKind.PAUSED}


def message(kind: AlertKind, facts: dict[str, Any]) -> str:
    name, fails, threshold = facts["integration"], facts["consecutive_failures"], facts["threshold"]
    if kind is AlertKind.PAUSED:
        why = facts.get("reason") or f"after {fails} consecutive failed deliveries (threshold {threshold})"
        text = (
            f"Integration {name} is PAUSED {why}. Nothing is sent to it; "
            f"{facts['held']} events are held, none dropped."
        )
    elif kind is AlertKind.RESUMED:
        text = (
            f"Integration {name} RESUMED ({facts['reason']}); {facts['held']} held events now drain in order."
        )
    else:
        share = 90 if kind is AlertKind.WARNING_90 else 50
        text = (
            f"Integration {name} has failed {fails} deliveries in a row, {share}% of its pause "
            f"threshold ({threshold})."
        )
    if facts.get("last_error"):
        text += f" Last error: {facts['last_error']}."
    return f"{text} Details: {facts['details']}"


class Alerts:
    def __init__(self, config: Config, public_url: str, store: Store) -> None:
        self._config = config
        self._public_url = public_url
        self._store = store

    async def send(
        self,
        kind: AlertKind,
        integration: str,
        *,
        consecutive_failures: int,
        last_error: str = "",
        held: int = 0,
        reason: str = "",
    ) -> None:
        configured = self._config.integration(integration)
        facts: dict[str, Any] = {
            "type": kind.value,
            "integration": integration,
            "consecutive_failures": consecutive_failures,
            "threshold": configured.failure_threshold if configured else None,
            "last_error": last_error,
            "held": held,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "details": f"{self._public_url}/admin/integrations/{integration}",
        }
        if reason:
            facts["reason"] = reason
        text = message(kind, facts)
        facts["message"] = text
        level = logging.INFO if kind is AlertKind.RESUMED else logging.WARNING
        log.log(level, "alert %s: %s", kind.value, text, extra={"alert": facts, "integration": integration})
        events = []
        for sink, alert in zip(self._config.alert_sinks, self._config.alerts, strict=True):
            body = orjson.dumps({"text": text} if alert.kind == "slack" else facts)
            request = StoredRequest("POST", str(sink.target), [("content-type", "application/json")], body)
            events.append(NewEvent(new_event_id(), sink.name, "", request.pack()))
        if events:
            await self._store.accept(events, IDEMPOTENCY_TTL_S)
        await self._store.count("alerts", {kind.value: 1})

    async def crossed(self, integration: str, finished: Finished, last_error: str) -> None:
        """Alerts for what an attempt's record crossed: 50% or 90% of the threshold, or the pause."""
        if not finished.signals:
            return
        try:
            held = (await self._store.health(integration))["held"] if "paused" in finished.signals else 0
            for name in finished.signals:
                await self.send(
                    SIGNALS[name],
                    integration,
                    consecutive_failures=finished.consecutive_failures,
                    last_error=last_error,
                    held=held,
                )
        except (RedisError, OSError) as exc:
            log.error("alerts %s for %s could not be stored: %s", finished.signals, integration, exc)
