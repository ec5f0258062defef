"""Who is online (the admin page's "mechanics online") is the server's to say: only
mechanics and admins may join the staff presence topic, only mechanics are listed, and
each under their own user id and name whatever the page sends."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from conftest import Account, LiveWorld

TOPIC = "realtime:mechanics-online"


class Socket:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.refs = 0

    async def push(self, event: str, payload: dict[str, Any]) -> str:
        self.refs += 1
        ref = str(self.refs)
        frame = {"topic": TOPIC, "event": event, "payload": payload, "ref": ref, "join_ref": "1"}
        await self.ws.send(json.dumps(frame))
        return ref

    async def until(self, match: Any, timeout: float = 10.0) -> dict[str, Any]:
        async def read() -> dict[str, Any]:
            while True:
                message: dict[str, Any] = json.loads(await self.ws.recv())
                if match(message):
                    return message

        return await asyncio.wait_for(read(), timeout)

    async def join(self, account: Account, key: str = "") -> dict[str, Any]:
        ref = await self.push(
            "phx_join",
            {
                "config": {"presence": {"key": key, "enabled": True}, "broadcast": {"self": False}},
                "access_token": account.token,
            },
        )
        reply = await self.until(lambda m: m["event"] == "phx_reply" and m["ref"] == ref)
        payload: dict[str, Any] = reply["payload"]
        return payload


async def open_socket(live: LiveWorld) -> ClientConnection:
    async with httpx.AsyncClient() as http:
        anon = (await http.get(f"{live.server.base}/api/config")).json()["anon_key"]
    return await connect(f"{live.server.ws_base}/realtime/v1/websocket?apikey={anon}&vsn=1.0.0")


async def test_customers_may_not_join_and_admins_may_not_be_listed(live: LiveWorld) -> None:
    customer = await live.make("cora", "customer")
    admin = await live.make("ada", "admin")
    async with await open_socket(live) as ws:
        refused = await Socket(ws).join(customer)
        assert refused["status"] == "error"
        assert refused["response"]["reason"].startswith("Unauthorized:")
    async with await open_socket(live) as ws:
        sock = Socket(ws)
        assert (await sock.join(admin))["status"] == "ok"
        ref = await sock.push("presence", {"type": "presence", "event": "track", "payload": {}})
        reply = await sock.until(lambda m: m["event"] == "phx_reply" and m["ref"] == ref)
        assert reply["payload"]["status"] == "error"
        assert "only mechanics are listed" in reply["payload"]["response"]["reason"]


async def test_a_mechanic_is_listed_under_its_own_id_and_name(live: LiveWorld) -> None:
    mechanic = await live.make("mo", "mechanic")
    admin = await live.make("ada", "admin")
    async with await open_socket(live) as admin_ws, await open_socket(live) as mech_ws:
        watcher = Socket(admin_ws)
        assert (await watcher.join(admin))["status"] == "ok"
        mech = Socket(mech_ws)
        assert (await mech.join(mechanic, key="someone-else"))["status"] == "ok"
        await mech.push(
            "presence",
            {
                "type": "presence",
                "event": "track",
                "payload": {"name": "Impostor", "user_id": "someone-else", "online_at": "now"},
            },
        )
        diff = await watcher.until(
            lambda m: m["event"] == "presence_diff" and m["payload"]["joins"]
        )
    joins = diff["payload"]["joins"]
    assert list(joins) == [str(mechanic.id)]
    meta = joins[str(mechanic.id)]["metas"][0]
    assert meta["user_id"] == str(mechanic.id)
    assert meta["name"] == "mo"
    assert meta["online_at"] == "now"  # the rest of the page's meta is kept
