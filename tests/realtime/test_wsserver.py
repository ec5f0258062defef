"""The native WebSocket server (the realtime/wsserver package): its frames, the frames
recipients share, batched writes, and the upgrades it leaves to uvicorn and the app."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from live_servers import serve_live
from prometheus_client import CollectorRegistry, generate_latest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.frames import Close, Frame, Opcode
from websockets.streams import StreamReader

from autodispatch.domain.principal import ANONYMOUS
from autodispatch.realtime import protocol as p
from autodispatch.realtime.events import Event
from autodispatch.realtime.gateway import Channel, Connection, Gateway, Limits
from autodispatch.realtime.log import BATCH_FROM, EventLogReader
from autodispatch.realtime.metrics import RealtimeMetrics
from autodispatch.realtime.router import Binding, Router, Subscription
from autodispatch.realtime.wsserver import RealtimeWebSocket, frame_bytes, protocol_for
from autodispatch.realtime.wsserver.reading import frame_parser
from conftest import LiveWorld


def parse_server_frame(data: bytes) -> Frame:
    """``data`` read by the websockets package as a client reads a server frame."""
    reader = StreamReader()
    reader.feed_data(data)
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        frame: Frame = done.value
        assert not reader.buffer, "bytes left after the frame"
        return frame
    raise AssertionError("the frame is incomplete")


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70_000])
def test_frame_bytes_is_one_whole_unmasked_frame(size: int) -> None:
    """At every length encoding (7-bit, 16-bit, 64-bit), a text frame carries the payload
    exactly and a binary one too."""
    payload = bytes(i % 251 for i in range(size))
    text = parse_server_frame(frame_bytes(payload))
    assert (text.opcode, text.fin, bytes(text.data)) == (Opcode.TEXT, True, payload)
    binary = parse_server_frame(frame_bytes(payload, 0x82))
    assert (binary.opcode, bytes(binary.data)) == (Opcode.BINARY, payload)


# --- a gateway with fake transports -------------------------------------------------------


class Transport:
    """Records each write; never full."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False


def gateway() -> Gateway:
    metrics = RealtimeMetrics(CollectorRegistry())
    router = Router({}, {})
    hub: Any = SimpleNamespace(router=router, metrics=metrics)
    return Gateway(hub, broker=None, tokens=None, limits=Limits())  # type: ignore[arg-type]


def native_channel(
    gw: Gateway, topic: str, bindings: tuple[Binding, ...]
) -> tuple[Transport, Subscription]:
    """A joined channel on a native socket, its subscription in the router."""
    config: Any = SimpleNamespace(uvicorn=True)
    wire = protocol_for(gw)(
        config=config, server_state=SimpleNamespace(connections=set()), app_state={}
    )
    assert isinstance(wire, RealtimeWebSocket)
    transport = Transport()
    wire.transport = transport  # type: ignore[assignment]
    wire.sent = gw.hub.metrics.sent.transport("websocket")
    conn = Connection(gw, p.VSN_1, ANONYMOUS, wire)
    join = p.parse_join(topic, {"config": {}}, conn.next_id, frozenset())
    channel = Channel(conn, topic, "1", join, ANONYMOUS)
    channel._held = None  # joined: live
    sub = Subscription(
        keys=frozenset({"pool:general"}), bindings=bindings, sink=channel, transport="websocket"
    )
    gw.hub.router.add(sub)
    return transport, sub


def flag_event(event_id: int) -> Event:
    row = {"key": f"flag-{event_id}", "enabled": True, "description": "x" * 50}
    return Event(
        id=event_id,
        at=datetime.now(UTC),
        schema="public",
        table="feature_flags",
        type="INSERT",
        row_id=row["key"],
        record=row,
        old_record=None,
        new_keys=frozenset({"pool:general"}),
        old_keys=frozenset(),
    )


FLAGS = (Binding(id=1, table="feature_flags", event="*"),)


def test_recipients_with_the_same_topic_and_bindings_share_one_frame() -> None:
    """An event is framed once per (topic, binding ids, vsn): channels that agree on them
    are written the very same bytes object; another topic gets its own frame."""
    gw = gateway()
    same = [native_channel(gw, "realtime:queue", FLAGS)[0] for _ in range(3)]
    other, _ = native_channel(gw, "realtime:other", FLAGS)
    event = flag_event(1)
    outcomes = gw.hub.router.route(event)
    assert outcomes == {"delivered": 4}
    assert len(event.frames) == 2
    frames = [t.writes[0] for t in same]
    assert frames[0] is frames[1] is frames[2], "one frame for every recipient"
    message = p.decode(parse_server_frame(frames[0]).data.decode(), p.VSN_1)
    assert (message.topic, message.payload["ids"]) == ("realtime:queue", [1])
    assert p.decode(parse_server_frame(other.writes[0]).data.decode(), p.VSN_1).topic == (
        "realtime:other"
    )


async def test_a_batch_of_events_is_written_once_per_connection() -> None:
    """When one read of the log brings BATCH_FROM events or more, each connection's frames
    of the batch go out in one write, in order; a smaller read writes each frame at once."""
    gw = gateway()
    transports = [native_channel(gw, "realtime:queue", FLAGS)[0] for _ in range(3)]
    db: Any = None  # route_all reads nothing
    reader = EventLogReader(db, gw.hub.router, gw.hub.metrics)
    events = [flag_event(i) for i in range(1, BATCH_FROM + 3)]
    await reader.route_all(events)
    for transport in transports:
        assert len(transport.writes) == 1
        assert event_ids(transport.writes[0]) == [e.id for e in events]
    small = [flag_event(100 + i) for i in range(BATCH_FROM - 1)]
    await reader.route_all(small)
    for transport in transports:
        assert len(transport.writes) == 1 + len(small)
        assert [i for w in transport.writes[1:] for i in event_ids(w)] == [e.id for e in small]


async def test_the_reader_times_commit_to_read_for_every_event() -> None:
    """Each event routed is observed once in autodispatch_realtime_commit_to_read_seconds,
    from its commit time: an event committed 40 ms ago lands above the 25 ms bound."""
    gw = gateway()
    db: Any = None  # route_all reads nothing
    reader = EventLogReader(db, gw.hub.router, gw.hub.metrics)
    old = flag_event(1)
    old.at = datetime.now(UTC) - timedelta(milliseconds=40)
    old.at_ts = old.at.timestamp()
    await reader.route_all([old, flag_event(2)])
    samples = {
        (s.name, s.labels.get("le")): s.value
        for metric in gw.hub.metrics.commit_to_read.collect()
        for s in metric.samples
    }
    assert samples[("autodispatch_realtime_commit_to_read_seconds_count", None)] == 2
    assert samples[("autodispatch_realtime_commit_to_read_seconds_bucket", "0.025")] == 1
    assert samples[("autodispatch_realtime_commit_to_read_seconds_bucket", "+Inf")] == 2
    assert samples[("autodispatch_realtime_commit_to_read_seconds_sum", None)] >= 0.04


def event_ids(data: bytes) -> list[int]:
    """The event ids of the postgres_changes frames concatenated in ``data``."""
    reader = StreamReader()
    reader.feed_data(data)
    ids: list[int] = []
    while reader.buffer:
        parser = Frame.parse(reader.read_exact, mask=False)
        try:
            next(parser)
        except StopIteration as done:
            message = p.decode(done.value.data.decode(), p.VSN_1)
            ids.append(message.payload["data"]["event_id"])
            continue
        raise AssertionError("an incomplete frame")
    return ids


# --- what a client sends ---------------------------------------------------------------------


def native_socket(gw: Gateway) -> tuple[RealtimeWebSocket, Transport, Connection]:
    """An upgraded native socket with no channel: its frames parsed, its writes recorded."""
    config: Any = SimpleNamespace(uvicorn=True)
    wire = protocol_for(gw)(
        config=config, server_state=SimpleNamespace(connections=set()), app_state={}
    )
    assert isinstance(wire, RealtimeWebSocket)
    transport = Transport()
    wire.transport = transport  # type: ignore[assignment]
    wire.ws = frame_parser()
    wire.conn = Connection(gw, p.VSN_1, ANONYMOUS, wire)
    return wire, transport, wire.conn


def client_frame(opcode: Opcode, data: bytes, *, fin: bool = True) -> bytes:
    """A frame as a client sends it (masked)."""
    return Frame(opcode, data, fin=fin).serialize(mask=True)


async def test_a_message_in_fragments_is_handled_once_whole() -> None:
    """A heartbeat split into three frames (TEXT, CONT, CONT) and a binary one split in
    two are each answered once, when their last fragment arrives."""
    wire, transport, _ = native_socket(gateway())
    text = json.dumps({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": "7"})
    head, middle, tail = text[:10].encode(), text[10:20].encode(), text[20:].encode()
    wire.data_received(client_frame(Opcode.TEXT, head, fin=False))
    wire.data_received(client_frame(Opcode.CONT, middle, fin=False))
    assert transport.writes == []
    wire.data_received(client_frame(Opcode.CONT, tail))
    assert len(transport.writes) == 1
    reply = p.decode(parse_server_frame(transport.writes[0]).data.decode(), p.VSN_1)
    assert (reply.topic, reply.event, reply.ref) == ("phoenix", "phx_reply", "7")
    binary = text.encode()
    wire.data_received(client_frame(Opcode.BINARY, binary[:5], fin=False))
    wire.data_received(client_frame(Opcode.CONT, binary[5:]))
    assert len(transport.writes) == 2
    wire.connection_lost(None)


async def test_a_text_message_that_is_not_utf8_closes_the_socket_with_1007() -> None:
    """Text that does not decode is not handled: the socket is closed with 1007 and the
    reason invalid_utf8."""
    wire, transport, conn = native_socket(gateway())
    wire.data_received(client_frame(Opcode.TEXT, b'{"topic": "\xff"}'))
    assert conn.closing == "invalid_utf8"
    close = parse_server_frame(transport.writes[-1])
    assert close.opcode is Opcode.CLOSE
    assert Close.parse(close.data) == Close(1007, "invalid_utf8")
    wire.connection_lost(None)


# --- the upgrades it leaves to uvicorn --------------------------------------------------------


@pytest.fixture
async def live(db_url: str, tmp_path: Path) -> AsyncIterator[LiveWorld]:
    async with serve_live(db_url, tmp_path) as world:
        yield world


async def test_other_websocket_paths_go_through_uvicorn_to_the_app(live: LiveWorld) -> None:
    """An upgrade to a path that is not a realtime one is handed to uvicorn's own
    protocol and the app, which has no such route (403); a realtime path refuses a bad
    apikey itself, with 401 and a JSON error."""
    server = live.server
    with pytest.raises(InvalidStatus) as elsewhere:
        async with connect(f"{server.ws_base}/realtime/v1/elsewhere", open_timeout=10):
            pass
    assert elsewhere.value.response.status_code == 403
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"{server.ws_base}/realtime/v1/websocket?apikey=x", open_timeout=10):
            pass
    response = refused.value.response
    assert response.status_code == 401
    assert response.headers["Content-Type"] == "application/json"
    assert "error" in json.loads(response.body)


def test_sent_frames_are_exposed_as_counter_and_cumulative_histogram() -> None:
    """Frames counted per transport on the hot path come out as
    autodispatch_realtime_delivered_total and a cumulative commit-to-send histogram whose
    buckets include their bound (le): 1 ms lands in le=0.001."""
    registry = CollectorRegistry()
    metrics = RealtimeMetrics(registry)
    sent = metrics.sent.transport("websocket")
    for latency in (0.0005, 0.001, 0.003, 0.2, 9.0, -0.5):
        sent.sent(latency)
    text = generate_latest(registry).decode()
    assert 'autodispatch_realtime_delivered_total{transport="websocket"} 6.0' in text
    bucket = 'autodispatch_realtime_commit_to_send_seconds_bucket{le="%s",transport="websocket"}'
    for le, count in (("0.001", 3), ("0.002", 3), ("0.003", 4), ("0.25", 5), ("+Inf", 6)):
        assert f"{bucket % le} {count:.1f}" in text, (le, count)
