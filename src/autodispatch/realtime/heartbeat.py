"""The heartbeat of one gateway process, and the dispatch health figures it measures.

Every `serve` process reads the event log and pushes to its subscribers. It records
itself in ``realtime.gateways`` (migration 0004) when it starts, refreshes the row every
few seconds with how far it has routed the log and how many subscribers it holds, and
deletes the row when it stops cleanly. `autodispatch audit` reads these rows with plain
SQL: which gateways run, whether one lags, and which ones died without stopping.

The same beat measures, with one query, what alerting needs from the database: offers
past their expiry, requests past their time to live, the age of the oldest event this
process has not routed, and the number of live gateways. They are Prometheus gauges on
the app's registry.

It lives beside the gateway it describes, but takes nothing from it: the app passes in
functions that give the reader's position and the subscriber count.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Callable

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from autodispatch import __version__
from autodispatch.background import Loops
from autodispatch.config import EXPIRY_GRACE_SECONDS
from autodispatch.db.database import Database

log = structlog.get_logger("autodispatch.ops")

HEARTBEAT_SECONDS = 5.0


class HealthMetrics:
    """Gauges refreshed by every heartbeat (values from the database, at that moment)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.offers_past_expiry = Gauge(
            "autodispatch_offers_past_expiry",
            f"Offers still open more than {EXPIRY_GRACE_SECONDS} s after their expiry",
            registry=registry,
        )
        self.requests_past_ttl = Gauge(
            "autodispatch_requests_past_ttl",
            f"Requests still queued more than {EXPIRY_GRACE_SECONDS} s after their time to live",
            registry=registry,
        )
        self.unrouted_age = Gauge(
            "autodispatch_realtime_unrouted_age_seconds",
            "Age of the oldest committed event this process has not routed yet (0: caught up)",
            registry=registry,
        )
        self.unsequenced_age = Gauge(
            "autodispatch_realtime_unsequenced_age_seconds",
            "Age of the oldest event written without an id yet (0: none); a server numbers"
            " its own at once and others' within its sequence poll interval",
            registry=registry,
        )
        self.gateways_live = Gauge(
            "autodispatch_gateways_live",
            "Gateway processes whose heartbeat is current, as this process sees the database",
            registry=registry,
        )
        self.heartbeat_failures = Counter(
            "autodispatch_heartbeat_failures_total",
            "Heartbeats that could not be written (retried at the next beat)",
            registry=registry,
        )


class GatewayHeartbeat:
    def __init__(
        self,
        db: Database,
        metrics: HealthMetrics,
        *,
        position: Callable[[], int],
        subscribers: Callable[[], int],
        request_ttl_seconds: int,
        interval: float = HEARTBEAT_SECONDS,
        loops: Loops | None = None,
    ) -> None:
        self.db = db
        self.metrics = metrics
        self.position = position
        self.subscribers = subscribers
        self.request_ttl_seconds = request_ttl_seconds
        self.interval = interval
        self.loops = loops if loops is not None else Loops()
        self.id = uuid.uuid4()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Register this process (a failure is logged, and the beats retry)."""
        try:
            await self._register()
        except Exception as exc:
            self.metrics.heartbeat_failures.inc()
            log.warning(
                "gateway_register_failed",
                gateway=str(self.id),
                error=f"{type(exc).__name__}: {exc}",
            )
        # Any error in a beat (a lost connection, a bug, a bad value from position()) is
        # logged and counted and the next beat runs: were the loop to end, the gauges
        # would freeze and the row would look like a dead gateway.
        beats = self.loops.run_forever(
            "gateway-heartbeat",
            self._beat_counted,
            interval=self.interval,
            stop=self._stop,
            event="gateway_heartbeat_failed",
        )
        self._task = asyncio.create_task(beats, name="gateway-heartbeat")

    async def stop(self) -> None:
        """Stop beating and remove this process's row: a clean stop is not a dead gateway.

        Never raises: it runs during shutdown, and the teardown after it must run too."""
        self._stop.set()
        if self._task is not None:
            # The beat loop catches every Exception; return_exceptions covers a task that was
            # cancelled or died anyway, without letting it escape into the shutdown.
            (outcome,) = await asyncio.gather(self._task, return_exceptions=True)
            if isinstance(outcome, BaseException):
                log.warning(
                    "gateway_heartbeat_ended",
                    gateway=str(self.id),
                    error=f"{type(outcome).__name__}: {outcome}",
                )
        try:
            async with self.db.as_service() as tx:
                await tx.execute("gateway_forget", {"id": self.id})
        except Exception as exc:
            log.warning(
                "gateway_forget_failed", gateway=str(self.id), error=f"{type(exc).__name__}: {exc}"
            )

    async def beat(self) -> None:
        """Write one heartbeat and refresh the health gauges."""
        position = self.position()
        async with self.db.as_service() as tx:
            updated = await tx.execute(
                "gateway_beat",
                {"id": self.id, "position": position, "subscribers": self.subscribers()},
            )
            health = await tx.one(
                "dispatch_health",
                {
                    "grace_seconds": EXPIRY_GRACE_SECONDS,
                    "request_ttl_seconds": self.request_ttl_seconds,
                    "position": position,
                },
            )
        if not updated:  # `repair --apply` forgot us while we were unreachable: come back
            await self._register()
        assert health is not None
        self.metrics.offers_past_expiry.set(health["offers_past_expiry"])
        self.metrics.requests_past_ttl.set(health["requests_past_ttl"])
        self.metrics.unrouted_age.set(health["unrouted_age_seconds"])
        self.metrics.unsequenced_age.set(health["unsequenced_age_seconds"])
        self.metrics.gateways_live.set(health["gateways_live"])

    async def _register(self) -> None:
        async with self.db.as_service() as tx:
            await tx.execute(
                "gateway_register",
                {
                    "id": self.id,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "version": __version__,
                    "heartbeat_seconds": self.interval,
                    "position": self.position(),
                },
            )
        log.info("gateway_registered", gateway=str(self.id))

    async def _beat_counted(self) -> None:
        try:
            await self.beat()
        except Exception:
            self.metrics.heartbeat_failures.inc()
            raise
