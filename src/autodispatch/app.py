"""The composition root: build the app from settings and a database URL."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import psycopg
import structlog
from fastapi import FastAPI, Request, Response

from autodispatch import __version__
from autodispatch.api import auth, catalog, dispatch, errors, payments, system
from autodispatch.api.deps import Services
from autodispatch.config import Settings
from autodispatch.db import migrate
from autodispatch.db.database import Database
from autodispatch.identity.accounts import Accounts
from autodispatch.metrics import Metrics

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


def _route_name(request: Request) -> str:
    """The route template (``/api/sessions/{session_id}``), so labels stay few."""
    route = request.scope.get("route")
    if route is None:
        return "unmatched"
    return str(getattr(route, "path_format", None) or getattr(route, "path", "other"))


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

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await db.open()
        stop = asyncio.Event()
        expiry = asyncio.create_task(run_expiry(services, stop), name="expiry")
        try:
            yield
        finally:
            stop.set()
            await expiry
            await db.close()

    app = FastAPI(
        title="autodispatch",
        version=__version__,
        description="Realtime dispatch of customer session requests to mechanics.",
        lifespan=lifespan,
    )
    app.state.services = services
    errors.install(app)
    for module in (system, auth, dispatch, catalog, payments):
        app.include_router(module.router)

    @app.middleware("http")
    async def measure(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = _route_name(request)
        services.metrics.http_requests.labels(
            route, request.method, str(response.status_code)
        ).inc()
        services.metrics.http_latency.labels(route).observe(time.perf_counter() - started)
        return response

    return app
