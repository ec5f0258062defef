"""The composition root: build the app from settings and a database URL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
from fastapi import FastAPI

from autodispatch import __version__
from autodispatch.api import (
    alerts,
    auth,
    catalog,
    chat,
    dispatch,
    errors,
    payments,
    probe,
    push,
    system,
)
from autodispatch.api.deps import Services
from autodispatch.api.observability import ObserveRequests, PoolCollector
from autodispatch.api.push_keys import VapidKeys
from autodispatch.api.push_sender import PushSender
from autodispatch.background import Loops
from autodispatch.config import Settings
from autodispatch.db import migrate
from autodispatch.db.database import Database
from autodispatch.identity.accounts import Accounts
from autodispatch.metrics import Metrics
from autodispatch.realtime import rest, sse, websocket
from autodispatch.realtime.broker import Broker
from autodispatch.realtime.heartbeat import GatewayHeartbeat, HealthMetrics
from autodispatch.realtime.hub import Hub, RealtimeSettings
from autodispatch.realtime.metrics import RealtimeMetrics
from autodispatch.web import pages

log = structlog.get_logger("autodispatch")


async def expire_once(services: Services) -> None:
    """Return expired offers to the queue and expire requests nobody took (one run)."""
    try:
        async with services.db.as_service() as tx:
            row = await tx.one(
                "expire_due", {"request_ttl_seconds": services.settings.request_ttl_seconds}
            )
        assert row is not None
    except Exception:
        services.metrics.expiry_runs.labels("error").inc()
        raise
    services.metrics.expiry_runs.labels("ok").inc()
    if row["offers_returned"]:
        services.metrics.expired.labels("offer").inc(row["offers_returned"])
        log.info("offers_returned_to_queue", count=row["offers_returned"])
    if row["requests_expired"]:
        services.metrics.expired.labels("request").inc(row["requests_expired"])
        log.info("requests_expired", count=row["requests_expired"])


async def run_expiry(services: Services, loops: Loops, stop: asyncio.Event) -> None:
    """Run ``expire_once`` about every ``expiry_interval_seconds`` until ``stop``.

    The expiry times live in the database, so this picks up where it left off after a
    restart; several servers may run it at once (rows are locked with SKIP LOCKED). Any
    failure is logged (``expiry_failed``) and counted, and the next run retries; the
    accept and queue reads do not rely on it (an offer past its expiry is queued there).
    """
    await loops.run_forever(
        "expiry",
        lambda: expire_once(services),
        interval=services.settings.expiry_interval_seconds,
        stop=stop,
        event="expiry_failed",
    )


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

    loops = Loops(services.metrics.registry)  # every background loop reports here (/readyz)

    realtime = Hub(
        db,
        RealtimeMetrics(services.metrics.registry),
        RealtimeSettings(
            poll_interval=settings.realtime_poll_interval,
            retention_seconds=settings.event_retention_seconds,
            queue_size=settings.realtime_queue_size,
            routing=settings.realtime_routing,  # "keys" unless benchmarking the baseline
            sequence_poll_interval=settings.realtime_sequence_poll_interval,
            sequence_spacing=settings.realtime_sequence_spacing,
        ),
        loops,
    )
    db.on_write_commit = realtime.sequencer.poke  # a write's events get their ids at once

    pusher = PushSender(
        db,
        services.metrics,
        VapidKeys.load(settings),
        request_ttl_seconds=settings.request_ttl_seconds,
        allowed_hosts=settings.push_allowed_hosts,
        loops=loops,
    )

    # Each process records itself for `autodispatch audit` and measures dispatch health.
    heartbeat = GatewayHeartbeat(
        db,
        HealthMetrics(services.metrics.registry),
        position=lambda: realtime.reader.routed,
        subscribers=lambda: len(realtime.router.subscriptions),
        request_ttl_seconds=settings.request_ttl_seconds,
        loops=loops,
    )
    services.metrics.registry.register(PoolCollector(db.pool.get_stats))

    broker = Broker(db, alive_interval=settings.realtime_presence_interval, loops=loops)
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
        expiry = asyncio.create_task(run_expiry(services, loops, stop), name="expiry")
        pushes = asyncio.create_task(pusher.run(stop), name="web-push")
        await realtime.start()
        await broker.start()
        await heartbeat.start()
        try:
            yield
        finally:
            await heartbeat.stop()
            stop.set()
            for conn in list(gateway.connections):
                await conn.shutdown()
            await broker.stop()
            await realtime.stop()
            await expiry
            await pushes
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
    app.state.log_reader = realtime.reader  # /readyz: is it caught up?
    app.state.heartbeat = heartbeat
    app.state.loops = loops  # /readyz: has every background loop run lately?
    app.state.push = pusher
    errors.install(app)
    for module in (
        system,
        auth,
        dispatch,
        catalog,
        payments,
        chat,
        alerts,
        push,
        probe,
        sse,
        websocket,
        rest,
        pages,
    ):
        app.include_router(module.router)

    app.add_middleware(ObserveRequests, metrics=services.metrics)
    return app
