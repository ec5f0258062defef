"""The composition root: build the app from settings and a database URL."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import psycopg
import structlog
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from autodispatch import __version__
from autodispatch.api import auth, catalog, dispatch, errors, payments, system
from autodispatch.api.deps import Services
from autodispatch.config import Settings
from autodispatch.db import migrate
from autodispatch.db.database import Database
from autodispatch.identity.accounts import Accounts
from autodispatch.metrics import Metrics
from autodispatch.realtime import rest, sse, websocket
from autodispatch.realtime.broker import Broker
from autodispatch.realtime.hub import Hub, RealtimeSettings
from autodispatch.realtime.metrics import RealtimeMetrics

log = structlog.get_logger("autodispatch")


async def run_expiry(services: Services, stop: asyncio.Event) -> None:
    """Return expired offers to the queue and expire requests nobody took, about every 0.5 s.

    The expiry times live in the database, so this picks up where it left off after a
    restart; several servers may run it at once (rows are locked with SKIP LOCKED).
    """
    interval = services.settings.expiry_interval_seconds
    while not stop.is_set():
        try:
            async with services.db.as_service() as tx:
                row = await tx.one(
                    "expire_due", {"request_ttl_seconds": services.settings.request_ttl_seconds}
                )
            assert row is not None
            services.metrics.expiry_runs.labels("ok").inc()
            if row["offers_returned"]:
                services.metrics.expired.labels("offer").inc(row["offers_returned"])
                log.info("offers_returned_to_queue", count=row["offers_returned"])
            if row["requests_expired"]:
                services.metrics.expired.labels("request").inc(row["requests_expired"])
                log.info("requests_expired", count=row["requests_expired"])
        except (psycopg.Error, OSError) as exc:
            # Counted and logged; the next run retries (a deadlock or a lost connection).
            services.metrics.expiry_runs.labels("error").inc()
            log.warning("expiry_failed", error=str(exc))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)


class MeasureRequests:
    """Count requests and their latency per route template (pure ASGI: no per-request
    task or stream, unlike ``@app.middleware("http")``)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            name = (
                "unmatched"
                if route is None
                else str(getattr(route, "path_format", None) or getattr(route, "path", "other"))
            )
            self.metrics.http_requests.labels(name, scope["method"], str(status)).inc()
            self.metrics.http_latency.labels(name).observe(time.perf_counter() - started)


def create_app(settings: Settings, database_url: str) -> FastAPI:
    settings = settings.with_secret()
    db = Database(database_url, max_size=settings.db_pool_max)
    accounts = Accounts(db, settings)
    services = Services(
        settings=settings,
        db=db,
        accounts=accounts,
        metrics=Metrics(),
        anon_key=accounts.tokens.anon_key(),
        expected_revision=migrate.head(),
    )

    realtime = Hub(
        db,
        RealtimeMetrics(services.metrics.registry),
        RealtimeSettings(
            poll_interval=settings.realtime_poll_interval,
            retention_seconds=settings.event_retention_seconds,
            queue_size=settings.realtime_queue_size,
            routing=settings.realtime_routing,  # "keys" unless benchmarking the baseline
        ),
    )

    broker = Broker(db)
    gateway = websocket.Gateway(
        realtime,
        broker,
        accounts.tokens,
        websocket.Limits(queue_size=settings.realtime_queue_size),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await db.open()
        stop = asyncio.Event()
        expiry = asyncio.create_task(run_expiry(services, stop), name="expiry")
        await realtime.start()
        await broker.start()
        try:
            yield
        finally:
            stop.set()
            for conn in list(gateway.connections):
                await conn.shutdown()
            await broker.stop()
            await realtime.stop()
            await expiry
            await db.close()

    app = FastAPI(
        title="autodispatch",
        version=__version__,
        description="Realtime dispatch of customer session requests to mechanics.",
        lifespan=lifespan,
    )
    app.state.services = services
    app.state.realtime = realtime
    app.state.gateway = gateway
    errors.install(app)
    for module in (system, auth, dispatch, catalog, payments, sse, websocket, rest):
        app.include_router(module.router)

    app.add_middleware(MeasureRequests, metrics=services.metrics)
    return app
