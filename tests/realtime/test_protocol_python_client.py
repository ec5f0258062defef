"""The Python client (``realtime`` on PyPI) against our frames and server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from protocol_helpers import (
    JS_JOIN,
    TABLES,
    TOPIC,
    ids_from,
    join,
    row_data,
)

from autodispatch.realtime.protocol import (
    RESUME_FROM_KEY,
    VSN_1,
    JoinConfig,
    Message,
    broadcast,
    decode,
    encode,
    encode_json,
    encode_user_broadcast,
    heartbeat_reply,
    join_reply_response,
    parse_join,
    phx_close,
    postgres_changes,
    postgres_changes_frame,
    presence_diff,
    presence_state,
    reply_error,
    reply_ok,
    system_error,
    system_subscribed,
)

# --- the Python client (realtime on PyPI) ------------------------------------------

realtime_message = pytest.importorskip(
    "realtime.message", reason="the Python `realtime` client is not installed in this venv"
)


def python_client_parses(frame: str | bytes) -> Any:
    """What the Python client's socket loop makes of a frame (it raises if it drops it)."""
    return realtime_message.ServerMessageAdapter.validate_json(frame)


def test_python_client_accepts_every_server_message() -> None:
    """The Python client's pydantic models accept each server message we encode (vsn 1.0.0)."""
    config = join(JS_JOIN)
    expected = [
        (reply_ok(TOPIC, "1", "1", join_reply_response(config)), "ReplyMessage"),
        (reply_error(TOPIC, "1", "1", "UnknownTable: no"), "ReplyMessage"),
        (heartbeat_reply(None), "ReplyMessage"),
        (system_subscribed(TOPIC), "SystemMessage"),
        (system_error(TOPIC, "system", "Token has expired 5 seconds ago"), "SystemMessage"),
        (phx_close(TOPIC, "1"), "ChannelCloseMessage"),
        (broadcast(TOPIC, "ping", {"a": 1}, meta={"id": "x"}), "BroadcastMessage"),
        (
            presence_state(TOPIC, {"u1": {"metas": [{"phx_ref": "F1", "x": 1}]}}),
            "PresenceStateMessage",
        ),
        (presence_diff(TOPIC, {}, {"u1": {"metas": [{"phx_ref": "F1"}]}}), "PresenceDiffMessage"),
    ]
    for msg, kind in expected:
        assert type(python_client_parses(encode(msg, VSN_1))).__name__ == kind, msg
    frame = postgres_changes_frame(TOPIC, [2], encode_json(row_data()), VSN_1)
    parsed = python_client_parses(frame)
    assert type(parsed).__name__ == "PostgresChangesMessage"
    assert parsed.payload["ids"] == [2]
    assert "event_id" not in parsed.payload["data"]  # delivered, but dropped by pydantic


@pytest.mark.parametrize(
    "frame",
    [
        # ref must be present, and null, on a server push
        '{"topic":"realtime:a","event":"system","payload":'
        '{"extension":"system","status":"ok","message":"m","channel":"a"}}',
        encode(
            Message(None, "ev:1", TOPIC, "postgres_changes", {"ids": [1], "data": row_data()}),
            VSN_1,
        ),
        # old_record may be absent or an object, never null
        encode(postgres_changes(TOPIC, [1], row_data(old_record=None)), VSN_1),
        # system payloads need `channel`
        encode(
            Message(
                None,
                None,
                TOPIC,
                "system",
                {"extension": "system", "status": "error", "message": "m"},
            ),
            VSN_1,
        ),
        # the reply's event must be one of * INSERT UPDATE DELETE
        encode(
            reply_ok(TOPIC, "1", "1", {"postgres_changes": [{"id": 1, "event": "insert"}]}), VSN_1
        ),
        # a broadcast's user payload must be an object
        encode(broadcast(TOPIC, "e", [1, 2]), VSN_1),
    ],
)
def test_python_client_drops_frames_that_break_its_schema(frame: str | bytes) -> None:
    """Pins the shapes the Python client silently drops, which a server must never send."""
    with pytest.raises(ValueError, match="validation error"):
        python_client_parses(frame)


def test_python_client_frames_decode() -> None:
    """Frames built by the Python client's own Message model decode with ours."""
    heartbeat = realtime_message.Message(topic="phoenix", event="heartbeat", payload={}, ref=None)
    assert decode(heartbeat.model_dump_json(), VSN_1) == Message(
        None, None, "phoenix", "heartbeat", {}
    )
    push = realtime_message.Message(
        topic=TOPIC,
        event="broadcast",
        payload={"type": "broadcast", "event": "ping", "payload": {"n": 1}},
        ref="3",
        join_ref="1",
    )
    assert decode(push.model_dump_json(), VSN_1) == Message(
        "1", "3", TOPIC, "broadcast", {"type": "broadcast", "event": "ping", "payload": {"n": 1}}
    )


class FakeConnection:
    """Stands in for the websockets connection: records sends, answers through ``server``."""

    def __init__(self, server: Callable[[Message], list[Message]]) -> None:
        self.server = server
        self.sent: list[Message] = []
        self.inbox: asyncio.Queue[str] = asyncio.Queue()
        self.close_code: int | None = None

    async def send(self, data: str) -> None:
        msg = decode(data, VSN_1)
        self.sent.append(msg)
        for answer in self.server(msg):
            self.push(answer)

    def push(self, msg: Message | str) -> None:
        self.inbox.put_nowait(msg if isinstance(msg, str) else str(encode(msg, VSN_1)))

    def __aiter__(self) -> FakeConnection:
        return self

    async def __anext__(self) -> str:
        return await self.inbox.get()

    async def close(self) -> None:
        self.close_code = 1000


async def wait_until(condition: Callable[[], bool]) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


def stock_server(joins: dict[str, JoinConfig]) -> Callable[[Message], list[Message]]:
    ids = ids_from()

    def answer(msg: Message) -> list[Message]:
        if msg.topic == "phoenix":
            return [heartbeat_reply(msg.ref)]
        if msg.event == "phx_join":
            config = parse_join(msg.topic, msg.payload, ids, TABLES)
            joins[msg.topic] = config
            response = join_reply_response(config)
            return [
                reply_ok(msg.topic, msg.ref, msg.join_ref, response),
                system_subscribed(msg.topic),
            ]
        if msg.event == "phx_leave":
            return [
                reply_ok(msg.topic, msg.ref, msg.join_ref, {}),
                phx_close(msg.topic, msg.join_ref),
            ]
        if msg.event == "presence":
            return [reply_ok(msg.topic, msg.ref, msg.join_ref, {})]
        return []

    return answer


@pytest.fixture
async def python_client() -> Any:
    from realtime import AsyncRealtimeClient

    joins: dict[str, JoinConfig] = {}
    connection = FakeConnection(stock_server(joins))
    client = AsyncRealtimeClient(
        "ws://localhost:4000/socket", token="anon-key", auto_reconnect=False
    )
    client._ws_connection = connection  # type: ignore[assignment]
    await client._on_connect()
    yield client, connection, joins
    await client.close()
    await asyncio.sleep(0)


async def test_python_client_end_to_end(
    python_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The Python client joins, gets SUBSCRIBED and each row event once per matching binding."""
    client, connection, joins = python_client
    channel = client.channel("dispatch", {"config": {"private": False}, RESUME_FROM_KEY: 40})
    got: list[tuple[str, Any]] = []
    channel.on_postgres_changes("*", lambda p: got.append(("all", p)), table="sessions")
    channel.on_postgres_changes(
        "INSERT",
        lambda p: got.append(("queued", p)),
        table="session_assignments",
        filter="status=eq.queued",
    )
    channel.on_broadcast("ping", lambda p: got.append(("ping", p)))
    states: list[Any] = []
    await asyncio.wait_for(
        channel.subscribe(lambda state, error: states.append((state.value, error))), 5
    )
    assert states == [("SUBSCRIBED", None)]

    join_msg = next(m for m in connection.sent if m.event == "phx_join")
    assert join_msg.ref == join_msg.join_ref is not None
    assert join_msg.payload["access_token"] == "anon-key"
    assert join_msg.payload[RESUME_FROM_KEY] == 40  # top-level keys survive, config keys do not
    assert join_msg.payload["config"]["postgres_changes"] == [
        {"event": "*", "schema": "public", "table": "sessions"},
        {
            "event": "INSERT",
            "schema": "public",
            "table": "session_assignments",
            "filter": "status=eq.queued",
        },
    ]
    heartbeat = next(m for m in connection.sent if m.topic == "phoenix")
    assert heartbeat == Message(None, None, "phoenix", "heartbeat", {})
    config = joins[TOPIC]
    assert config.resume_from == 40
    all_id, queued_id = (b.id for b in config.bindings)

    data = encode_json(row_data())
    connection.push(postgres_changes_frame(TOPIC, [queued_id], data, VSN_1))
    connection.push(
        postgres_changes_frame(
            TOPIC, [queued_id], encode_json(row_data(type="UPDATE", old_record={})), VSN_1
        )
    )
    connection.push(postgres_changes_frame(TOPIC, [999], data, VSN_1))
    connection.push(encode_user_broadcast(TOPIC, "ping", {"n": 1}, VSN_1))
    connection.push(postgres_changes_frame(TOPIC, [all_id, queued_id], data, VSN_1))
    await wait_until(lambda: len(got) >= 4)
    await asyncio.sleep(0.02)
    assert [kind for kind, _ in got] == ["queued", "ping", "all", "queued"]
    assert got[0][1]["ids"] == [queued_id]
    assert got[0][1]["data"]["record"]["status"] == "queued"
    assert got[1][1] == {"event": "ping", "payload": {"n": 1}}
    assert not [r for r in caplog.records if "Unrecognized message format" in r.getMessage()]

    await channel.send_broadcast("ping", {"n": 2})
    await channel.track({"user": "u1"})
    await client.set_auth("new-user-jwt")
    pushes = {m.event: m for m in connection.sent if m.topic == TOPIC}
    assert pushes["broadcast"].payload == {
        "type": "broadcast",
        "event": "ping",
        "payload": {"n": 2},
    }
    assert pushes["broadcast"].join_ref == join_msg.join_ref
    assert pushes["presence"].payload == {"event": "track", "payload": {"user": "u1"}}
    assert pushes["access_token"].payload == {"access_token": "new-user-jwt"}

    await channel.unsubscribe()
    await wait_until(lambda: states[-1][0] == "CLOSED")
    leave = next(m for m in connection.sent if m.event == "phx_leave")
    assert (leave.payload, leave.join_ref) == ({}, join_msg.join_ref)


async def test_python_client_fails_the_channel_on_a_changed_binding(python_client: Any) -> None:
    """A join reply whose entry differs from the request (here the filter) is CHANNEL_ERROR."""
    client, connection, _ = python_client
    honest = connection.server

    def server(msg: Message) -> list[Message]:
        answers: list[Message] = honest(msg)
        if msg.event != "phx_join":
            return answers
        reply = answers[0]
        entry = reply.payload["response"]["postgres_changes"][0]
        changed = {"postgres_changes": [{**entry, "filter": "status=eq.offered"}]}
        return [reply_ok(reply.topic, reply.ref, reply.join_ref, changed)]

    connection.server = server
    channel = client.channel("dispatch")
    channel.on_postgres_changes("*", lambda p: None, table="sessions", filter="status=eq.queued")
    states: list[Any] = []
    await asyncio.wait_for(
        channel.subscribe(lambda state, error: states.append((state.value, str(error)))), 5
    )
    assert states[0] == (
        "CHANNEL_ERROR",
        "mismatch between server and client bindings for postgres changes",
    )
    # It then leaves the channel on its own; our leave reply and close end it.
    await wait_until(lambda: states[-1] == ("CLOSED", "None"))
    assert [m.event for m in connection.sent if m.topic == TOPIC] == ["phx_join", "phx_leave"]
