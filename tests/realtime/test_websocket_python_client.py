"""The stock Python `realtime` client against our WebSocket, on a real socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_servers import serve_live

from conftest import Account, LiveWorld
from realtime import AsyncRealtimeClient, RealtimeSubscribeStates


class Inbox:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()

    def __call__(self, payload: dict[str, Any]) -> None:
        self.items.append(payload)
        self.arrived.set()

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.items) < count:
            self.arrived.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"got {len(self.items)} of {count} events: {self.items}")
            try:
                await asyncio.wait_for(self.arrived.wait(), remaining)
            except TimeoutError:
                continue
        return self.items[:count]


@asynccontextmanager
async def subscribed(
    live: LiveWorld, who: Account, table: str = "session_assignments", filter: str | None = None
) -> AsyncIterator[Inbox]:
    async with httpx.AsyncClient() as http:
        anon = (await http.get(f"{live.server.base}/api/config")).json()["anon_key"]
    client = AsyncRealtimeClient(
        f"{live.server.ws_base}/realtime/v1", token=anon, auto_reconnect=False
    )
    await client.connect()
    await client.set_auth(who.token)
    inbox = Inbox()
    states: list[Any] = []
    channel = client.channel(f"queue-{who.email}")
    channel.on_postgres_changes("*", schema="public", table=table, filter=filter, callback=inbox)
    await channel.subscribe(lambda state, err: states.append((state, err)))
    assert states and states[0][0] == RealtimeSubscribeStates.SUBSCRIBED, states
    try:
        yield inbox
    finally:
        await client.close()


@pytest.fixture
async def live(db_url: str, tmp_path: Path) -> AsyncIterator[LiveWorld]:
    """The server as ``autodispatch serve`` runs it (the realtime WebSocket served natively)."""
    async with serve_live(db_url, tmp_path) as world:
        yield world


async def test_python_client_gets_the_queued_request_and_its_removal(live: LiveWorld) -> None:
    """The demo flow through the stock Python client: queued request with its summary to both
    mechanics, nothing to another customer, a removal to the loser after an accept."""
    customer = await live.make("cara", "customer")
    other_customer = await live.make("olly", "customer")
    mo = await live.make("mo", "mechanic")
    max_ = await live.make("max", "mechanic")
    async with (
        subscribed(live, mo) as mo_inbox,
        subscribed(live, max_) as max_inbox,
        subscribed(live, other_customer) as other_inbox,
        subscribed(live, customer) as own_inbox,
        httpx.AsyncClient(timeout=10) as http,
    ):
        pair = await live.queued(http, customer)
        aid = pair["assignment"]["id"]
        for inbox in (mo_inbox, max_inbox):
            (event,) = await inbox.wait_for(1)
            data = event["data"]
            assert data["type"] == "UPDATE" and data["record"]["id"] == aid
            assert data["record"]["status"] == "queued"
            assert data["record"]["request_summary"]["vehicle"] == "2016 Toyota Corolla"
        own = await own_inbox.wait_for(2)
        assert [e["data"]["record"]["status"] for e in own] == ["pending_waiver", "queued"]
        r = await http.post(f"{live.server.base}/api/assignments/{aid}/accept", headers=mo.headers)
        assert r.status_code == 200
        (_, accepted) = await mo_inbox.wait_for(2)
        assert accepted["data"]["record"]["status"] == "accepted"
        (_, removal) = await max_inbox.wait_for(2)
        assert removal["data"]["type"] == "DELETE"
        assert removal["data"]["old_record"]["id"] == aid
        await asyncio.sleep(0.3)
        assert other_inbox.items == []


async def test_filters_apply_on_top_of_visibility(live: LiveWorld) -> None:
    """A filter `status=eq.queued` gets the queued row and its removal when it leaves the filter."""
    customer = await live.make("cara", "customer")
    mo = await live.make("mo", "mechanic")
    async with (
        subscribed(live, mo, filter="status=eq.queued") as inbox,
        httpx.AsyncClient(timeout=10) as http,
    ):
        pair = await live.queued(http, customer)
        aid = pair["assignment"]["id"]
        (event,) = await inbox.wait_for(1)
        assert event["data"]["record"]["status"] == "queued"
        await http.post(
            f"{live.server.base}/api/sessions/{pair['session']['id']}/cancel",
            headers=customer.headers,
        )
        (_, gone) = await inbox.wait_for(2)
        assert gone["data"]["type"] == "DELETE" and gone["data"]["old_record"]["id"] == aid
