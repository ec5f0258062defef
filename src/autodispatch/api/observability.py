"""What every HTTP request leaves behind: a request id, a log line, metrics.

``ObserveRequests`` takes the caller's ``X-Request-ID`` (when it is a sane token) or
makes one, binds it with structlog's contextvars so every line logged while the request
is handled carries it, and echoes it in the response. When the request ends it logs one
``request`` line and counts it, with its latency, by route template, method and status.
An exception no handler caught is logged here (with the id and the traceback) and
answered with a JSON 500 in our error shape, instead of a bare text body.

``PoolCollector`` exposes the connection pool's own statistics (psycopg_pool
``get_stats``) as Prometheus metrics, read when /metrics is scraped.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from autodispatch.metrics import Metrics

log = structlog.get_logger("autodispatch.http")

REQUEST_ID_HEADER = "x-request-id"
# An id from outside ends up in every log line: accept only a plain token of sane length.
_SANE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,127}$")
# Probes and scrapes are counted, but logged only when they fail: they arrive every few
# seconds and would drown the lines that matter.
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
# A method is a metric label: any other word a client sends is counted as OTHER, so a
# client cannot make new time series (the route label is bounded the same way).
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "OTHER"


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The caller's X-Request-ID when it is a sane token, else a new one."""
    for name, value in headers:
        if name.lower() == b"x-request-id":
            candidate = value.decode("latin-1").strip()
            if _SANE_ID.match(candidate):
                return candidate
            break
    return uuid.uuid4().hex


class ObserveRequests:
    """Pure ASGI (no per-request task or stream, unlike ``@app.middleware("http")``)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope.get("headers", []))
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            if scope["type"] == "websocket":
                await self.app(scope, receive, send)
                return
            await self._http(scope, receive, send, request_id)

    async def _http(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request_failed", method=scope["method"], path=scope["path"])
            if response_started:
                raise  # too late for an answer: the server closes the connection
            status = 500
            await _internal_error(send, request_id)
        finally:
            elapsed = time.perf_counter() - started
            route = _route_template(scope)
            method = method_label(scope["method"])
            self.metrics.http_requests.labels(route, method, str(status)).inc()
            self.metrics.http_latency.labels(route, method, str(status)).observe(elapsed)
            if route not in QUIET_ROUTES or status >= 400:
                (log.error if status >= 500 else log.info)(
                    "request",
                    method=scope["method"],
                    path=scope["path"],
                    route=route,
                    status=status,
                    duration_ms=round(elapsed * 1000, 2),
                )


def _route_template(scope: Scope) -> str:
    """The route's path template (``/api/sessions/{session_id}``), never the raw path:
    one time series per route, whatever ids are in the URLs."""
    route = scope.get("route")
    if route is None:
        return "unmatched"
    return str(getattr(route, "path_format", None) or getattr(route, "path", "other"))


async def _internal_error(send: Send, request_id: str) -> None:
    body = json.dumps(
        {
            "error": {
                "code": "internal_error",
                "message": f"the server failed on this request; quote request id {request_id}",
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 500,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (REQUEST_ID_HEADER.encode(), request_id.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# psycopg_pool get_stats() keys -> (metric, help, scale). Counters only appear in the
# stats once they moved, hence .get(key, 0).
_POOL_COUNTERS = {
    "requests_num": ("autodispatch_db_pool_requests", "Connections asked of the pool", 1),
    "requests_queued": (
        "autodispatch_db_pool_requests_queued",
        "Requests that had to wait for a connection",
        1,
    ),
    "requests_wait_ms": (
        "autodispatch_db_pool_request_wait_seconds",
        "Time spent waiting for a connection",
        0.001,
    ),
    "requests_errors": (
        "autodispatch_db_pool_request_errors",
        "Requests for a connection that failed (timeout, pool closed)",
        1,
    ),
    "usage_ms": ("autodispatch_db_pool_usage_seconds", "Time connections were lent out", 0.001),
    "returns_bad": (
        "autodispatch_db_pool_returns_bad",
        "Connections returned in a bad state (and discarded)",
        1,
    ),
    "connections_num": ("autodispatch_db_pool_connects", "Connection attempts to the server", 1),
    "connections_ms": (
        "autodispatch_db_pool_connect_seconds",
        "Time spent opening connections",
        0.001,
    ),
    "connections_errors": (
        "autodispatch_db_pool_connect_errors",
        "Connection attempts that failed",
        1,
    ),
    "connections_lost": (
        "autodispatch_db_pool_connections_lost",
        "Connections found broken (by the pool's check)",
        1,
    ),
}


class PoolCollector(Collector):
    def __init__(self, stats: Callable[[], Mapping[str, int]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        connections = GaugeMetricFamily(
            "autodispatch_db_pool_connections",
            "Connections of the pool: open (size) and idle (available)",
            labels=["state"],
        )
        connections.add_metric(["open"], s.get("pool_size", 0))
        connections.add_metric(["idle"], s.get("pool_available", 0))
        yield connections
        bounds = GaugeMetricFamily(
            "autodispatch_db_pool_bound", "The pool's configured size", labels=["bound"]
        )
        bounds.add_metric(["min"], s.get("pool_min", 0))
        bounds.add_metric(["max"], s.get("pool_max", 0))
        yield bounds
        yield GaugeMetricFamily(
            "autodispatch_db_pool_requests_waiting",
            "Requests waiting for a connection now",
            value=s.get("requests_waiting", 0),
        )
        for key, (name, help_text, scale) in _POOL_COUNTERS.items():
            yield CounterMetricFamily(name, help_text, value=s.get(key, 0) * scale)
