"""Broadcast over HTTP reaches WebSocket subscribers of the topic."""

from __future__ import annotations

import asyncio
import json

import httpx
import websockets

from autodispatch.realtime import protocol as p
from conftest import LiveWorld


async def test_rest_broadcast_reaches_joined_sockets(live: LiveWorld) -> None:
    """POST /realtime/v1/api/broadcast → 202, and the joined socket receives the message;
    without a token → 401; an empty topic → 422."""
    async with httpx.AsyncClient(timeout=10) as http:
        anon = (await http.get(f"{live.server.base}/api/config")).json()["anon_key"]
        url = f"{live.server.ws_base}/realtime/v1/websocket?apikey={anon}&vsn=1.0.0"
        async with websockets.connect(url) as ws:
            join = p.Message("1", "1", "realtime:lobby", "phx_join", {"config": {}})
            await ws.send(p.encode(join, p.VSN_1))
            reply = p.decode(await ws.recv(), p.VSN_1)
            assert reply.event == "phx_reply" and reply.payload["status"] == "ok"
            for path in ("/realtime/v1/api/broadcast", "/api/broadcast"):
                r = await http.post(
                    f"{live.server.base}{path}",
                    headers={"apikey": anon},
                    json={"messages": [{"topic": "lobby", "event": "hello", "payload": {"n": 1}}]},
                )
                assert r.status_code == 202, r.text
                while True:
                    msg = p.decode(await asyncio.wait_for(ws.recv(), 5), p.VSN_1)
                    if msg.event == "broadcast":
                        break
                assert msg.payload == {"type": "broadcast", "event": "hello", "payload": {"n": 1}}
        r = await http.post(
            f"{live.server.base}/realtime/v1/api/broadcast",
            json={"messages": [{"topic": "lobby", "event": "x", "payload": {}}]},
        )
        assert r.status_code == 401
        r = await http.post(
            f"{live.server.base}/realtime/v1/api/broadcast",
            headers={"apikey": anon},
            content=json.dumps({"messages": [{"topic": "realtime:", "event": "x"}]}),
        )
        assert r.status_code == 422
