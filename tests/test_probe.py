"""The delivery probe (`autodispatch probe`) against a live server: it passes when delivery
works, and names the failing step (and the key or filter at fault) when it does not; an
answer of the wrong shape is a failed step too, never an exception."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import psycopg
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from autodispatch.db.database import Database
from autodispatch.ops.probe import explain_missing, run_probe
from autodispatch.realtime.explain import Explanation, explain_delivery
from conftest import LiveWorld

PASSWORD = "password-123"


async def explain_ping(
    db_url: str, ping_id: str, email: str, row_filter: str | None = None
) -> Explanation:
    """What `autodispatch probe` says when the ping's event does not arrive."""
    db = Database(db_url, min_size=1, max_size=1)
    await db.open()
    try:
        event_id = await explain_missing(db, ping_id)
        assert event_id is not None, "the ping's insert was not logged"
        return await explain_delivery(db, event_id, email, row_filter=row_filter)
    finally:
        await db.close()


async def test_probe_passes_for_each_kind_of_account(live: LiveWorld) -> None:
    for name, kind in (("cora", "customer"), ("mick", "mechanic"), ("ada", "admin")):
        account = await live.make(name, kind)
        result = await run_probe(live.server.base, account.email, PASSWORD)
        assert result.ok, result.as_json()
        assert [s.name for s in result.steps] == [
            "config",
            "sign-in",
            "connect",
            "subscribe",
            "change",
            "delivery",
        ]
        assert result.user_id == str(account.id)
        assert result.latency_ms is not None and result.latency_ms >= 0
        assert result.commit_to_receive_ms is not None


async def test_a_wrong_password_fails_at_sign_in(live: LiveWorld) -> None:
    account = await live.make("cora", "customer")
    result = await run_probe(live.server.base, account.email, "not-the-password")
    assert not result.ok
    failed = result.failed
    assert failed is not None and failed.name == "sign-in"
    assert "invalid_grant" in failed.detail or "400" in failed.detail
    assert [s.name for s in result.steps] == ["config", "sign-in"]


async def test_an_unreachable_server_fails_at_config() -> None:
    result = await run_probe("http://127.0.0.1:9", "x@example.com", "pw", timeout=2)
    assert result.failed is not None and result.failed.name == "config"


async def test_a_filter_that_hides_the_change_is_named(live: LiveWorld) -> None:
    account = await live.make("cora", "customer")
    result = await run_probe(
        live.server.base, account.email, PASSWORD, row_filter="nonce=eq.nothing", timeout=2
    )
    failed = result.failed
    assert failed is not None and failed.name == "delivery"
    assert result.ping_id is not None
    why = await explain_ping(live.db_url, result.ping_id, account.email, "nonce=eq.nothing")
    assert not why.delivered
    assert "filter 'nonce=eq.nothing' does not match" in why.text


async def test_a_missing_visibility_key_is_named(live: LiveWorld) -> None:
    """A broken visibility rule (the first version's silent failure): the ping is written
    with keys the user does not hold; the probe fails at delivery and the explanation
    lists the row's keys against the user's, so the missing key shows."""
    account = await live.make("cora", "customer")
    with psycopg.connect(live.db_url, autocommit=True) as conn:
        conn.execute(
            "create or replace function public.probe_visibility_keys(p public.probe_pings)"
            " returns text[] language sql immutable as $$ select array['user:nobody'] $$"
        )
    result = await run_probe(live.server.base, account.email, PASSWORD, timeout=2)
    failed = result.failed
    assert failed is not None and failed.name == "delivery"
    assert result.ping_id is not None
    why = await explain_ping(live.db_url, result.ping_id, account.email)
    assert not why.delivered
    assert "'user:nobody'" in why.text
    assert f"'user:{account.id}'" in why.text
    assert "it would need one of user:nobody" in why.text


@contextlib.contextmanager
def fake_server(app: Starlette) -> Iterator[str]:
    """``app`` served by uvicorn on a free port, in a thread; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the fake server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


async def config_ok(request: Request) -> Response:
    return JSONResponse({"anon_key": "anon"})


async def signed_in(request: Request) -> Response:
    return JSONResponse({"access_token": "token", "user": {"id": "u1", "app_metadata": {}}})


async def test_an_html_page_instead_of_the_config_fails_at_config() -> None:
    """A proxy's HTML page with status 200 where /api/config's JSON was due is the failed
    config step, saying the answer is not JSON; the probe does not raise."""

    async def html(request: Request) -> Response:
        return HTMLResponse("<html><body>Welcome to nginx!</body></html>")

    with fake_server(Starlette(routes=[Route("/api/config", html)])) as base:
        result = await run_probe(base, "x@example.com", "pw", timeout=2)
    assert [s.name for s in result.steps] == ["config"]
    failed = result.failed
    assert failed is not None and failed.name == "config"
    assert "not JSON" in failed.detail and "nginx" in failed.detail


async def test_a_sign_in_answer_without_a_user_fails_at_sign_in() -> None:
    """A token answer without user.id is the failed sign-in step, naming the field."""

    async def token_only(request: Request) -> Response:
        return JSONResponse({"access_token": "token"})

    routes = [
        Route("/api/config", config_ok),
        Route("/auth/v1/token", token_only, methods=["POST"]),
    ]
    with fake_server(Starlette(routes=routes)) as base:
        result = await run_probe(base, "x@example.com", "pw", timeout=2)
    failed = result.failed
    assert failed is not None and failed.name == "sign-in"
    assert failed.detail == "the answer has no 'user' field"


async def test_a_frame_that_is_not_json_fails_at_subscribe() -> None:
    """A realtime server that answers the join with a frame that is not JSON is the
    failed subscribe step; the probe closes the socket and returns its result."""

    async def realtime(ws: WebSocket) -> None:
        await ws.accept()
        await ws.receive_text()
        await ws.send_text("<html>502 Bad Gateway</html>")
        with contextlib.suppress(WebSocketDisconnect):
            await ws.receive_text()

    routes = [
        Route("/api/config", config_ok),
        Route("/auth/v1/token", signed_in, methods=["POST"]),
        WebSocketRoute("/realtime/v1/websocket", realtime),
    ]
    with fake_server(Starlette(routes=routes)) as base:
        result = await run_probe(base, "x@example.com", "pw", timeout=2)
    assert [s.name for s in result.steps] == ["config", "sign-in", "connect", "subscribe"]
    failed = result.failed
    assert failed is not None and failed.name == "subscribe"
    assert "not JSON" in failed.detail and "502 Bad Gateway" in failed.detail
