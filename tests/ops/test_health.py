"""Health and observability: /readyz with its reasons, /metrics, request ids in headers
and in every log line, and the gateway heartbeat the audit reads."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from fastapi import FastAPI
from ops_helpers import sql

from autodispatch.db.database import Database
from autodispatch.logs import configure_logging
from conftest import World


async def test_readyz_is_ready_when_every_check_passes(world: World) -> None:
    """The database answers, it is at head, the log reader is caught up, every background
    loop completed a run lately."""
    r = await world.client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "status": "ready",
        "reasons": [],
        "checks": {"database": "ok", "migrations": "ok", "realtime": "ok", "background": "ok"},
    }


async def test_readyz_says_the_migrations_are_behind(world: World) -> None:
    """A database at an older revision is not ready, and the reason says what to run."""
    sql(world.app.state.services.db.url, "update alembic_version set version_num = '0003'")
    r = await world.client.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "not_ready"
    assert body["checks"]["migrations"].startswith("database is at revision 0003")
    assert "autodispatch migrate" in body["reasons"][0]


async def test_readyz_says_the_log_reader_is_behind(world: World) -> None:
    """A reader that stopped routing while events keep committing is not ready."""
    await world.app.state.realtime.stop()  # the reader stops; the database does not
    await world.queued()
    sql(world.app.state.services.db.url, "update realtime.events set at = now() - interval '1 min'")
    r = await world.client.get("/readyz")
    assert r.status_code == 503
    reason = r.json()["checks"]["realtime"]
    assert reason.startswith("the realtime log reader is behind: event ")
    assert "is not routed yet" in reason
    assert r.json()["checks"]["database"] == "ok"


async def test_readyz_says_the_database_is_unreachable(world: World) -> None:
    """When the database cannot be reached the reason names the error."""
    svc = world.app.state.services
    working = svc.db
    svc.db = Database("postgresql://nobody@127.0.0.1:1/none")  # a pool never opened
    try:
        r = await world.client.get("/readyz")
    finally:
        svc.db = working
    assert r.status_code == 503
    assert r.json()["reasons"][0].startswith("database unreachable: PoolClosed")


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text ``text``."""
    for line in text.splitlines():
        if not line.startswith(name + ("{" if labels else " ")):
            continue
        inside = line[line.find("{") + 1 : line.rfind("}")] if labels else ""
        found = dict(re.findall(r'(\w+)="([^"]*)"', inside))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} {labels} in /metrics")


async def test_metrics_cover_http_routes_the_pool_and_dispatch_health(world: World) -> None:
    """Requests are counted and timed by route template and status; the pool's statistics,
    the heartbeat's dispatch health and the background loops' last runs are exposed."""
    created = await world.request()
    sid = created["session"]["id"]
    for _ in range(2):
        r = await world.client.get(f"/api/sessions/{sid}", headers=world.customer.headers)
        assert r.status_code == 200
    assert (await world.client.get("/nowhere")).status_code == 404
    await world.app.state.heartbeat.beat()
    text = (await world.client.get("/metrics")).text

    route = "/api/sessions/{session_id}"
    assert metric(text, "autodispatch_http_requests_total", route=route, status="200") == 2
    assert (
        metric(
            text,
            "autodispatch_http_request_seconds_count",
            route=route,
            method="GET",
            status="200",
        )
        == 2
    )
    assert metric(text, "autodispatch_http_requests_total", route="unmatched", status="404") == 1
    assert sid not in text  # never a raw path
    assert metric(text, "autodispatch_db_pool_connections", state="open") >= 1
    assert metric(text, "autodispatch_db_pool_bound", bound="max") == 20
    assert metric(text, "autodispatch_db_pool_requests_total") > 0
    assert metric(text, "autodispatch_gateways_live") == 1
    assert metric(text, "autodispatch_offers_past_expiry") == 0
    assert metric(text, "autodispatch_requests_past_ttl") == 0
    assert metric(text, "autodispatch_realtime_unrouted_age_seconds") >= 0
    for loop in ("expiry", "web-push", "gateway-heartbeat", "realtime-bus"):
        assert metric(
            text, "autodispatch_background_loop_last_success_timestamp_seconds", loop=loop
        )


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """Logging configured as `serve` does it (JSON), into a buffer; reset afterwards."""
    buffer = io.StringIO()
    configure_logging("json", stream=buffer)
    try:
        yield buffer
    finally:
        structlog.reset_defaults()
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.setLevel(logging.WARNING)


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]


def add_test_routes(app: FastAPI) -> None:
    async def inside() -> dict[str, bool]:
        structlog.get_logger("test").info("inside_handler")
        logging.getLogger("test.stdlib").warning("stdlib line")
        return {"ok": True}

    async def boom() -> None:
        raise RuntimeError("boom on purpose")

    app.add_api_route("/test/inside", inside)
    app.add_api_route("/test/boom", boom)


async def test_every_log_line_of_a_request_carries_its_id(
    world: World, log_lines: io.StringIO
) -> None:
    """A given X-Request-ID is echoed and on every line logged while the request is
    handled (ours and the standard library's); without one, an id is made."""
    add_test_routes(world.app)
    log_lines.truncate(0)
    r = await world.client.get("/test/inside", headers={"X-Request-ID": "req-abc.123"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-abc.123"
    found = lines(log_lines)
    events = {line["event"]: line for line in found if line.get("request_id") == "req-abc.123"}
    assert set(events) == {"inside_handler", "stdlib line", "request"}
    assert events["request"]["route"] == "/test/inside" and events["request"]["status"] == 200
    assert events["request"]["level"] == "info" and "timestamp" in events["request"]

    r = await world.client.get("/api/workshops")
    made = r.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    r = await world.client.get("/api/workshops", headers={"X-Request-ID": "bad id\n{json}"})
    assert r.headers["x-request-id"] not in ("bad id\n{json}", made)
    assert all(line.get("request_id") for line in lines(log_lines) if line["event"] == "request")
    assert structlog.contextvars.get_contextvars() == {}  # nothing leaks past the request


async def test_an_unhandled_error_is_logged_with_the_id_and_answered_in_json(
    world: World, log_lines: io.StringIO
) -> None:
    """An exception no handler caught: one JSON 500 naming the request id, one log line
    with the traceback and the id."""
    add_test_routes(world.app)
    r = await world.client.get("/test/boom", headers={"X-Request-ID": "boom-1"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "boom-1"
    assert r.json()["error"]["code"] == "internal_error"
    assert "boom-1" in r.json()["error"]["message"]
    failed = [line for line in lines(log_lines) if line["event"] == "request_failed"]
    assert len(failed) == 1 and failed[0]["request_id"] == "boom-1"
    assert "boom on purpose" in json.dumps(failed[0]["exception"])
    request = [line for line in lines(log_lines) if line["event"] == "request"]
    assert request[-1]["status"] == 500 and request[-1]["level"] == "error"


async def test_each_server_records_its_heartbeat_and_forgets_it_on_a_clean_stop(
    world: World,
) -> None:
    """The running app is a gateway row with its pid and how far it routed the log; a row
    `repair` forgot comes back at the next beat."""
    url = world.app.state.services.db.url
    heartbeat = world.app.state.heartbeat
    rows = sql(url, "select id, pid, position from realtime.gateways")
    assert rows == [(heartbeat.id, os.getpid(), rows[0][2])]
    await world.queued()
    reader = world.app.state.log_reader
    head = sql(url, "select last_id from realtime.stream")[0][0]
    for _ in range(100):
        if reader.routed >= head:
            break
        await asyncio.sleep(0.05)
    await heartbeat.beat()
    assert sql(url, "select position from realtime.gateways") == [(head,)]
    sql(url, "delete from realtime.gateways")
    await heartbeat.beat()
    assert sql(url, "select id from realtime.gateways") == [(heartbeat.id,)]


async def test_a_heartbeat_that_fails_unexpectedly_keeps_beating_and_stops_cleanly(
    world: World, log_lines: io.StringIO
) -> None:
    """Any error in a beat (not only a database one) is logged and counted, and the next
    beat runs; stop() never raises into the shutdown, and still forgets the row."""
    from prometheus_client import CollectorRegistry

    from autodispatch.realtime.heartbeat import GatewayHeartbeat, HealthMetrics

    url = world.app.state.services.db.url
    calls = 0

    def position() -> int:
        nonlocal calls
        calls += 1
        if calls in (2, 3) or calls > 8:  # 1: registration; then two bad beats, later all
            raise ValueError("position unavailable")
        return 0

    registry = CollectorRegistry()
    metrics = HealthMetrics(registry)

    def sample(name: str) -> float:
        return registry.get_sample_value(name) or 0.0

    heartbeat = GatewayHeartbeat(
        world.app.state.services.db,
        metrics,
        position=position,
        subscribers=lambda: 0,
        request_ttl_seconds=3600,
        interval=0.05,
    )
    await heartbeat.start()
    for _ in range(200):
        if sample("autodispatch_gateways_live") > 0:  # a beat after the failures went through
            break
        await asyncio.sleep(0.02)
    assert sample("autodispatch_gateways_live") == 2  # this one and the app's own
    assert sample("autodispatch_heartbeat_failures_total") >= 2
    assert heartbeat._task is not None and not heartbeat._task.done()
    assert sql(url, "select count(*) from realtime.gateways where id = %s", (heartbeat.id,)) == [
        (1,)
    ]
    while calls <= 10:  # failing at every beat from here on
        await asyncio.sleep(0.02)
    await heartbeat.stop()  # raised ValueError before the fix
    assert sql(url, "select count(*) from realtime.gateways where id = %s", (heartbeat.id,)) == [
        (0,)
    ]
    failed = [line for line in lines(log_lines) if line["event"] == "gateway_heartbeat_failed"]
    assert failed and "position unavailable" in json.dumps(failed[0])


async def test_the_live_gateways_gauge_and_the_audit_agree(world: World) -> None:
    """One rule for a live gateway: within 3 beats and never less than 30 s. A gateway
    beating every 5 s, last seen 20 s ago, is live for the gauge and the audit; one seen
    40 s ago is stopped for both."""
    from ops_helpers import audit

    url = world.app.state.services.db.url
    sql(
        url,
        "insert into realtime.gateways (id, host, pid, version, heartbeat_seconds, seen_at)"
        " values (gen_random_uuid(), 'a', 1, '0.1.0', 5, now() - interval '20 seconds'),"
        " (gen_random_uuid(), 'b', 2, '0.1.0', 5, now() - interval '40 seconds')",
    )
    await world.app.state.heartbeat.beat()
    text = (await world.client.get("/metrics")).text
    gateways = (await audit(url)).facts["gateways"]
    assert sorted((g["host"], g["live"]) for g in gateways if g["host"] in ("a", "b")) == [
        ("a", True),
        ("b", False),
    ]
    assert metric(text, "autodispatch_gateways_live") == sum(g["live"] for g in gateways) == 2


async def wait_until(condition: Any, seconds: float = 10.0) -> None:
    """Poll ``condition`` (a coroutine function) until it is true, or fail."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true within {seconds} s: {condition.__doc__}")
        await asyncio.sleep(0.02)


async def test_a_background_loop_survives_any_error_and_says_when_it_stopped_working(
    log_lines: io.StringIO,
) -> None:
    """An iteration that raises our error, a bug or a lost connection is logged (a bug with
    its traceback) and counted, the loop goes on; while it fails for longer than its
    threshold it is stale, and a run that completes makes it fresh again."""
    import psycopg
    from prometheus_client import CollectorRegistry

    from autodispatch.background import Loops
    from autodispatch.domain.errors import Conflict

    registry = CollectorRegistry()
    loops = Loops(registry)
    failures: list[Exception] = [
        Conflict("refused by the database", code="some_code"),
        RuntimeError("a bug"),
        psycopg.OperationalError("connection lost"),
    ]
    failing = True
    calls = 0

    async def iteration() -> None:
        nonlocal calls
        calls += 1
        if failing:
            raise failures[(calls - 1) % len(failures)]

    def errors() -> float:
        return (
            registry.get_sample_value(
                "autodispatch_background_loop_errors_total", {"loop": "test-loop"}
            )
            or 0.0
        )

    def last_success() -> float | None:
        return registry.get_sample_value(
            "autodispatch_background_loop_last_success_timestamp_seconds", {"loop": "test-loop"}
        )

    stop = asyncio.Event()
    task = asyncio.create_task(
        loops.run_forever("test-loop", iteration, interval=0.01, stop=stop, stale_after=0.3)
    )
    try:

        async def stale() -> bool:
            """the loop is stale after failing for longer than 0.3 s"""
            return bool(loops.stale()) and errors() >= 3

        await wait_until(stale)
        assert not task.done()
        (reason,) = loops.stale()
        assert reason.startswith("the background loop test-loop has never completed a run for")
        assert "(allowed 0.3 s); last error: " in reason
        assert last_success() == 0  # never

        failing = False

        async def fresh() -> bool:
            """the loop completed a run"""
            return not loops.stale() and last_success() is not None

        await wait_until(fresh)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert errors() >= 3 and loops["test-loop"].errors == errors()
    failed = [line for line in lines(log_lines) if line["event"] == "background_loop_failed"]
    by_error = {line["error"]: line for line in failed}
    conflict = by_error["Conflict: refused by the database"]
    assert conflict["loop"] == "test-loop" and conflict["level"] == "error"
    assert "refused by the database" in json.dumps(conflict["exception"])
    assert by_error["RuntimeError: a bug"]["level"] == "error"
    lost = by_error["OperationalError: connection lost"]
    assert lost["level"] == "warning" and "exception" not in lost  # expected: no traceback


async def test_the_expiry_loop_survives_an_app_error_and_readyz_names_it_meanwhile(
    world: World, log_lines: io.StringIO
) -> None:
    """expire_due failing with one of our errors (the database refusing it) no longer ends
    the expiry task: each failure is logged and counted, /readyz names the loop while it
    has not completed a run for longer than its threshold, and once the database lets it
    run again it returns lapsed offers and /readyz is ready."""
    url = world.app.state.services.db.url
    sql(
        url,
        "alter function api.expire_due(interval) rename to expire_due_saved;"
        " create function api.expire_due(p_request_ttl interval, out offers_returned int,"
        " out requests_expired int) language plpgsql as $$ begin"
        " perform api.fail(409, 'sabotaged', 'expiry refused by a test'); end $$",
    )

    async def failing_twice() -> bool:
        """the expiry task ran and failed at least twice"""
        text = (await world.client.get("/metrics")).text
        try:
            return metric(text, "autodispatch_expiry_runs_total", outcome="error") >= 2
        except AssertionError:  # no error counted yet
            return False

    await wait_until(failing_twice)  # the old task died at the first failure
    text = (await world.client.get("/metrics")).text
    assert metric(text, "autodispatch_background_loop_errors_total", loop="expiry") >= 2
    failed = [line for line in lines(log_lines) if line["event"] == "expiry_failed"]
    assert failed[0]["loop"] == "expiry" and failed[0]["level"] == "error"
    assert "expiry refused by a test" in json.dumps(failed[0]["exception"])

    # Its threshold is 30 s (ten intervals, at least 30 s); a test does not wait that long.
    world.app.state.loops["expiry"].stale_after = 0.5
    await asyncio.sleep(0.6)
    r = await world.client.get("/readyz")
    assert r.status_code == 503
    reason = r.json()["checks"]["background"]
    assert reason.startswith("the background loop expiry has not completed a run for")
    assert "Conflict: expiry refused by a test" in reason
    assert r.json()["reasons"] == [reason]

    sql(
        url,
        "drop function api.expire_due(interval);"
        " alter function api.expire_due_saved(interval) rename to expire_due",
    )
    pair = await world.queued()
    aid = pair["assignment"]["id"]
    r = await world.client.post(
        f"/api/assignments/{aid}/offer",
        json={"mechanic_id": str(world.mechanic.mechanic_id), "ttl_seconds": 60},
        headers=world.admin.headers,
    )
    assert r.status_code == 200
    sql(
        url,
        "update session_assignments set offer_expires_at = now() - interval '1 second'"
        " where id = %s",
        (aid,),
    )

    async def returned() -> bool:
        """the still-running task returned the lapsed offer to the queue"""
        rows = sql(url, "select status from session_assignments where id = %s", (aid,))
        return rows == [("queued",)]

    await wait_until(returned)
    r = await world.client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"]["background"] == "ok"
