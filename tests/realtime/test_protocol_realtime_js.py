"""realtime-js (npm), run under node (installed once per machine into ``REALTIME_JS_CACHE``,
keyed by ``REALTIME_JS_VERSION``), against our frames and server.

Most of its ~620 lines are the JavaScript each check runs under node, kept beside the
assertions on what it prints.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import npm_cache
import pytest
from protocol_helpers import (
    JS_JOIN,
    REALTIME_JS_VERSION,
    TABLES,
    TOPIC,
    ids_from,
    row_data,
)

from autodispatch.realtime.events import Event
from autodispatch.realtime.protocol import (
    RESUME_FROM_KEY,
    VSN_1,
    VSN_2,
    Filter,
    Message,
    ProtocolError,
    broadcast,
    columns_for,
    decode,
    encode,
    encode_json,
    encode_user_broadcast,
    join_reply_response,
    parse_filter,
    parse_join,
    phx_close,
    postgres_changes,
    postgres_changes_frame,
    reply_error,
    reply_ok,
    system_subscribed,
)
from autodispatch.realtime.router import Binding, Router, Subscription

# --- realtime-js (npm), under node ---------------------------------------------------


def install_realtime_js() -> Path:
    """The npm package, installed once per machine (see npm_cache)."""
    return npm_cache.install(
        f"realtime-js-{REALTIME_JS_VERSION}", [f"@supabase/realtime-js@{REALTIME_JS_VERSION}"]
    )


@pytest.fixture(scope="session")
def realtime_js() -> Path:
    if shutil.which("node") is None:
        pytest.skip("node is not installed; the realtime-js checks need it")
    return install_realtime_js()


NODE_HELPERS = r"""
const dir = process.env.RTJS_DIR + '/node_modules/@supabase/realtime-js'
const input = JSON.parse(require('fs').readFileSync(0, 'utf8'))
const toB64 = (ab) => Buffer.from(new Uint8Array(ab)).toString('base64')
const fromB64 = (s) => {
  const b = Buffer.from(s, 'base64')
  return b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength)
}
const frame = (r) => (typeof r === 'string' ? { text: r } : { b64: toB64(r) })
const unframe = (f) => ('text' in f ? f.text : fromB64(f.b64))
function revive(v) {
  if (Array.isArray(v)) return v.map(revive)
  if (v && typeof v === 'object') {
    if ('__b64__' in v) return fromB64(v.__b64__)
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, revive(x)]))
  }
  return v
}
function plain(v) {
  if (v instanceof ArrayBuffer) return { __b64__: toB64(v) }
  if (Array.isArray(v)) return v.map(plain)
  if (v && typeof v === 'object') {
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, plain(x)]))
  }
  return v === undefined ? null : v
}
const print = (out) => { process.stdout.write(JSON.stringify(out)); process.exit(0) }
"""

SERIALIZER_SCRIPT = (
    NODE_HELPERS
    + r"""
const Serializer = require(dir + '/dist/main/lib/serializer.js').default
const s = new Serializer()
print({
  encoded: input.encode.map((m) => s.encode(revive(m), frame)),
  decoded: input.decode.map((f) => s.decode(unframe(f), (m) => plain(m))),
})
"""
)

CLIENT_SCRIPT = (
    NODE_HELPERS
    + r"""
const { RealtimeClient, postgresChangesFilter } = require(dir)
const version = require(dir + '/package.json').version
const sent = [], events = [], statuses = []
let socket = null
class FakeWebSocket {
  constructor(url) {
    this.url = url
    this.readyState = 0
    socket = this
    setTimeout(() => { this.readyState = 1; this.onopen && this.onopen({}) }, 0)
  }
  send(data) { sent.push(frame(data)) }
  close(code, reason) {
    this.readyState = 3
    this.onclose && this.onclose({ code: code || 1000, reason: reason || '' })
  }
}
const client = new RealtimeClient('ws://localhost:4000/socket', {
  params: { apikey: 'anon-key' }, transport: FakeWebSocket, vsn: input.vsn,
  heartbeatIntervalMs: 3600000, timeout: 3600000,
})
client.setAuth('user-jwt')
const channel = client.channel('dispatch', { config: input.config })
if (input.join_extra) channel.updateJoinPayload(input.join_extra)
input.bindings.forEach((b, i) => {
  const binding = b.builder ? { ...b, filter: postgresChangesFilter().eq(...b.builder) } : b
  delete binding.builder
  channel.on('postgres_changes', binding, (payload, ref) => {
    events.push({ kind: 'postgres_changes', binding: i, payload, ref: ref ?? null })
  })
})
channel.on('broadcast', { event: '*' }, (payload) => {
  events.push({ kind: 'broadcast', payload: plain(payload) })
})
channel.on('system', {}, (payload) => events.push({ kind: 'system', payload }))
channel.subscribe((status, err) => {
  statuses.push([status, err ? err.message : null])
  if (status === 'SUBSCRIBED') for (const m of input.sends) channel.send(revive(m))
})
setTimeout(() => {
  for (const f of input.frames) socket.onmessage({ data: unframe(f) })
  const state = () => channel.state
  const done = () => print({ version, url: socket.url, sent, events, statuses, state: state() })
  setTimeout(done, 20)
}, 20)
"""
)


def run_node(script: str, package: Path, request: Any) -> Any:
    result = subprocess.run(
        ["node", "-e", script],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "RTJS_DIR": str(package)},
    )
    if result.returncode != 0:
        pytest.fail(f"node failed:\n{result.stderr}")
    return json.loads(result.stdout)


def as_frame(raw: str | bytes) -> dict[str, str]:
    if isinstance(raw, bytes):
        return {"b64": base64.b64encode(raw).decode()}
    return {"text": raw}


def from_frame(frame: dict[str, str]) -> str | bytes:
    return base64.b64decode(frame["b64"]) if "b64" in frame else frame["text"]


def b64(data: bytes) -> dict[str, str]:
    return {"__b64__": base64.b64encode(data).decode()}


def test_realtime_js_frames_decode(realtime_js: Path) -> None:
    """Frames realtime-js's own serializer writes (kind-3 JSON and binary pushes, Latin-1
    topics, v2 arrays for join and heartbeat) decode with ours."""
    broadcast_push = {"type": "broadcast", "event": "ping", "payload": {"a": [1, "é"]}}
    pushes = [
        {
            "join_ref": "1",
            "ref": "2",
            "topic": TOPIC,
            "event": "broadcast",
            "payload": broadcast_push,
        },
        {
            "join_ref": "1",
            "ref": "3",
            "topic": "realtime:café",
            "event": "broadcast",
            "payload": {"type": "broadcast", "event": "bin", "payload": b64(b"\x00\xff\x10")},
        },
        {"join_ref": "4", "ref": "4", "topic": TOPIC, "event": "phx_join", "payload": JS_JOIN},
        {"join_ref": None, "ref": "5", "topic": "phoenix", "event": "heartbeat", "payload": {}},
    ]
    out = run_node(SERIALIZER_SCRIPT, realtime_js, {"encode": pushes, "decode": []})
    frames = [from_frame(f) for f in out["encoded"]]
    assert isinstance(frames[0], bytes) and frames[0][0] == 3
    assert isinstance(frames[1], bytes) and frames[1][0] == 3
    assert [decode(f, VSN_2) for f in frames] == [
        Message("1", "2", TOPIC, "broadcast", broadcast_push),
        Message(
            "1",
            "3",
            "realtime:café",
            "broadcast",
            {"type": "broadcast", "event": "bin", "payload": b"\x00\xff\x10"},
        ),
        Message("4", "4", TOPIC, "phx_join", JS_JOIN),
        Message(None, "5", "phoenix", "heartbeat", {}),
    ]


def test_our_server_frames_decode_in_realtime_js(realtime_js: Path) -> None:
    """Our v2 text frames and kind-4 binary broadcasts decode in realtime-js's serializer."""
    ours = [
        reply_ok(
            TOPIC, "2", "1", {"postgres_changes": [{"event": "*", "schema": "public", "id": 1}]}
        ),
        postgres_changes(TOPIC, [1, 2], row_data()),
        broadcast(TOPIC, "ping", {"a": "é"}),
        broadcast(TOPIC, "bin", b"\x00\x01\xfe", meta={"id": "m-1"}),
        phx_close(TOPIC, "1"),
    ]
    frames = [as_frame(encode(m, VSN_2)) for m in ours]
    frames.append({"text": postgres_changes_frame(TOPIC, [3], encode_json(row_data()), VSN_2)})
    out = run_node(SERIALIZER_SCRIPT, realtime_js, {"encode": [], "decode": frames})
    expected = [
        {
            "join_ref": m.join_ref,
            "ref": m.ref,
            "topic": m.topic,
            "event": m.event,
            "payload": {k: b64(v) if isinstance(v, bytes) else v for k, v in m.payload.items()},
        }
        for m in [*ours, postgres_changes(TOPIC, [3], row_data())]
    ]
    assert out["decoded"] == expected


def test_realtime_js_filter_builder_strings_parse(realtime_js: Path) -> None:
    """Filters written by realtime-js's RealtimePostgresFilterBuilder parse to their values."""
    script = (
        NODE_HELPERS
        + r"""
const { postgresChangesFilter } = require(dir)
print(input.map(([op, col, val]) => postgresChangesFilter()[op](col, val).build()))
"""
    )
    cases = [
        ("eq", "name", "a,b"),
        ("eq", "name", ' say "hi" \\ '),
        ("neq", "n", 5),
        ("gte", "at", "2026-01-01T00:00:00+00:00"),
        ("in", "status", ["queued", "a,b", "c)", "x y"]),
        ("eq", "flag", True),
    ]
    built = run_node(script, realtime_js, [list(c) for c in cases])
    parsed = [parse_filter(text) for text in built]
    assert parsed == [
        Filter("name", "eq", "a,b"),
        Filter("name", "eq", ' say "hi" \\ '),
        Filter("n", "neq", "5"),
        Filter("at", "gte", "2026-01-01T00:00:00+00:00"),
        Filter("status", "in", ("queued", "a,b", "c)", "x y")),
        Filter("flag", "eq", "true"),
    ]


JS_BINDINGS = [
    {"event": "*", "schema": "public", "table": "sessions"},
    {
        "event": "INSERT",
        "schema": "public",
        "table": "session_assignments",
        "builder": ["status", "queued"],
    },
]


def js_session(
    package: Path, vsn: str, frames_for: Callable[[Message], list[str | bytes]]
) -> tuple[dict[str, Any], Message]:
    """Run a realtime-js client twice: once to see its join, once with our answers to it.

    Refs are counters, so the second run sends the same join; that is asserted."""
    request: dict[str, Any] = {
        "vsn": vsn,
        "config": {"broadcast": {"self": True}, RESUME_FROM_KEY: 9},
        "join_extra": {RESUME_FROM_KEY: 7},
        "bindings": JS_BINDINGS,
        "sends": [],
        "frames": [],
    }
    first = run_node(CLIENT_SCRIPT, package, request)
    join_msg = decode(from_frame(first["sent"][0]), vsn)
    request["frames"] = [as_frame(f) for f in frames_for(join_msg)]
    request["sends"] = [
        {"type": "broadcast", "event": "ping", "payload": {"n": 1}},
        *(
            [{"type": "broadcast", "event": "bin", "payload": b64(b"\x01\x02")}]
            if vsn == VSN_2
            else []
        ),
    ]
    second = run_node(CLIENT_SCRIPT, package, request)
    assert second["version"] == REALTIME_JS_VERSION
    assert second["sent"][0] == first["sent"][0]
    return second, join_msg


@pytest.mark.parametrize("vsn", [VSN_2, VSN_1])
def test_realtime_js_client_end_to_end(realtime_js: Path, vsn: str) -> None:
    """A real RealtimeClient joins against our reply, gets SUBSCRIBED, and receives row events
    reshaped and coerced, broadcasts, and each duplicate frame again; a stale close is ignored."""
    events_sent: dict[str, Any] = {}

    def answers(join_msg: Message) -> list[str | bytes]:
        config = parse_join(join_msg.topic, join_msg.payload, ids_from(), TABLES)
        all_id, queued_id = (b.id for b in config.bindings)
        events_sent["config"] = config
        record = {
            "id": "5b2f0c3e-8f6a-4c1b-9e43-1d2c3b4a5f60",
            "count": "3",
            "active": "t",
            "doc": '{"a":1}',
            "tags": "{a,b}",
            "note": "12",
        }
        types = {
            "id": "uuid",
            "count": "int4",
            "active": "bool",
            "doc": "jsonb",
            "tags": "_text",
            "note": "text",
        }
        insert = row_data(table="sessions", record=record, columns=columns_for(record, types))
        queued = encode_json(row_data())
        update = encode_json(row_data(type="UPDATE", old_record={"status": "new"}))
        frames: list[str | bytes] = [
            encode(
                reply_ok(
                    join_msg.topic, join_msg.ref, join_msg.join_ref, join_reply_response(config)
                ),
                vsn,
            ),
            encode(system_subscribed(join_msg.topic), vsn),
            encode(
                Message(
                    None,
                    "ev:41",
                    TOPIC,
                    "postgres_changes",
                    {"ids": [all_id], "data": insert, "event_id": 41},
                ),
                vsn,
            ),
            postgres_changes_frame(TOPIC, [queued_id], queued, vsn),
            postgres_changes_frame(TOPIC, [queued_id], queued, vsn),
            postgres_changes_frame(TOPIC, [queued_id], update, vsn),
            postgres_changes_frame(TOPIC, [999], queued, vsn),
            encode_user_broadcast(TOPIC, "ping", {"n": 2}, vsn, meta={"id": "m-1"}),
            encode(phx_close(TOPIC, "999"), vsn),
        ]
        if vsn == VSN_2:
            frames.append(encode_user_broadcast(TOPIC, "bin", b"\x00\xfe", vsn))
        return frames

    out, join_msg = js_session(realtime_js, vsn, answers)
    assert out["url"].endswith(f"vsn={vsn}")
    assert join_msg.event == "phx_join"
    assert join_msg.ref == join_msg.join_ref is not None
    assert set(join_msg.payload["config"]) == {
        "broadcast",
        "presence",
        "postgres_changes",
        "private",
    }
    assert join_msg.payload["config"]["postgres_changes"][1]["filter"] == "status=eq.queued"
    assert join_msg.payload["access_token"] == "user-jwt"
    assert join_msg.payload[RESUME_FROM_KEY] == 7
    assert events_sent["config"].resume_from == 7

    assert out["statuses"] == [["SUBSCRIBED", None]]
    assert out["state"] == "joined"
    kinds = [(e["kind"], e.get("binding")) for e in out["events"]]
    expected_kinds = [
        ("system", None),
        ("postgres_changes", 0),
        ("postgres_changes", 1),
        ("postgres_changes", 1),
        ("broadcast", None),
    ]
    if vsn == VSN_2:
        expected_kinds.append(("broadcast", None))
    assert kinds == expected_kinds
    system, insert, queued = out["events"][:3]
    assert system["payload"]["channel"] == "dispatch"
    assert insert["payload"] == {
        "schema": "public",
        "table": "sessions",
        "commit_timestamp": "2026-01-01T00:00:00Z",
        "eventType": "INSERT",
        "new": {
            "id": "5b2f0c3e-8f6a-4c1b-9e43-1d2c3b4a5f60",
            "count": 3,
            "active": True,
            "doc": {"a": 1},
            "tags": ["a", "b"],
            "note": "12",
        },
        "old": {},
        "errors": None,
    }
    assert insert["ref"] == "ev:41"  # the frame ref is the callback's second argument
    assert queued["payload"]["new"] == {
        "id": "5b2f0c3e-8f6a-4c1b-9e43-1d2c3b4a5f60",
        "status": "queued",
    }
    assert out["events"][4]["payload"] == {
        "type": "broadcast",
        "event": "ping",
        "payload": {"n": 2},
        "meta": {"id": "m-1"},
    }
    if vsn == VSN_2:
        assert out["events"][5]["payload"] == {
            "type": "broadcast",
            "event": "bin",
            "payload": b64(b"\x00\xfe"),
        }

    pushes = [decode(from_frame(f), vsn) for f in out["sent"][1:]]
    assert pushes[0] == Message(
        join_msg.join_ref,
        pushes[0].ref,
        TOPIC,
        "broadcast",
        {"type": "broadcast", "event": "ping", "payload": {"n": 1}},
    )
    if vsn == VSN_2:
        assert isinstance(from_frame(out["sent"][1]), bytes)
        assert pushes[1].payload == {"type": "broadcast", "event": "bin", "payload": b"\x01\x02"}


def test_realtime_js_fails_the_channel_on_a_changed_binding(realtime_js: Path) -> None:
    """realtime-js compares each echoed entry to its binding: a changed filter makes it
    leave the channel (reported CLOSED first) and report CHANNEL_ERROR."""

    def answers(join_msg: Message) -> list[str | bytes]:
        config = parse_join(join_msg.topic, join_msg.payload, ids_from(), TABLES)
        response = join_reply_response(config)
        response["postgres_changes"][1]["filter"] = "status=eq.offered"
        return [encode(reply_ok(join_msg.topic, join_msg.ref, join_msg.join_ref, response), VSN_2)]

    out, _ = js_session(realtime_js, VSN_2, answers)
    assert out["statuses"] == [
        ["CLOSED", None],
        ["CHANNEL_ERROR", "mismatch between server and client bindings for postgres changes"],
    ]
    assert out["state"] == "errored"
    assert decode(from_frame(out["sent"][-1]), VSN_2).event == "phx_leave"


def test_realtime_js_reports_a_join_error_reason(realtime_js: Path) -> None:
    """An error join reply reaches the subscribe callback as CHANNEL_ERROR with our reason."""

    def answers(join_msg: Message) -> list[str | bytes]:
        reason = ProtocolError("UnknownTable", "table 'x' is not served").reason
        return [encode(reply_error(join_msg.topic, join_msg.ref, join_msg.join_ref, reason), VSN_2)]

    out, _ = js_session(realtime_js, VSN_2, answers)
    assert out["statuses"] == [["CHANNEL_ERROR", "UnknownTable: table 'x' is not served"]]
    assert out["state"] == "errored"


def test_realtime_js_throws_on_a_top_level_ids_key_and_other_binary_kinds(
    realtime_js: Path,
) -> None:
    """Pins why presence key "ids" is refused and only kind 4 is sent as binary: realtime-js
    throws on a non-row payload with a top-level ids key, and on binary kinds other than 4."""
    script = (
        NODE_HELPERS
        + r"""
const { RealtimeClient } = require(dir)
let socket = null
class FakeWebSocket {
  constructor() {
    this.readyState = 0
    socket = this
    setTimeout(() => { this.readyState = 1; this.onopen({}) }, 0)
  }
  send(data) { this.last = data }
  close() {}
}
const client = new RealtimeClient('ws://localhost:4000/socket', {
  params: { apikey: 'anon-key' }, transport: FakeWebSocket, heartbeatIntervalMs: 3600000,
})
const channel = client.channel('room')
channel.on('presence', { event: 'sync' }, () => {})
channel.subscribe(() => {})
const attempt = (data) => {
  try { socket.onmessage({ data }); return null } catch (e) { return e.constructor.name }
}
setTimeout(() => {
  const [joinRef, ref] = JSON.parse(socket.last)
  const ok = { status: 'ok', response: { postgres_changes: [] } }
  print([
    attempt(JSON.stringify([joinRef, ref, 'realtime:room', 'phx_reply', ok])),
    attempt(JSON.stringify([null, null, 'realtime:room', 'presence_state', input.good])),
    attempt(JSON.stringify([null, null, 'realtime:room', 'presence_state', input.bad])),
    attempt(unframe(input.kind2)),
  ])
}, 10)
"""
    )
    request = {
        "good": {"u1": {"metas": [{"phx_ref": "a"}]}},
        "bad": {"ids": {"metas": [{"phx_ref": "a"}]}},
        "kind2": as_frame(b"\x02\x01\x01xy"),
    }
    assert run_node(script, realtime_js, request) == [None, None, "TypeError", "TypeError"]


QUEUED_LIST = {
    "event": "*",
    "schema": "public",
    "table": "session_assignments",
    "filter": "status=eq.queued",
}
ALL_UPDATES = {"event": "UPDATE", "schema": "public", "table": "session_assignments"}


class FrameRecorder:
    """A router sink keeping each ``postgres_changes`` frame as the socket would send it."""

    def __init__(self, vsn: str) -> None:
        self.vsn = vsn
        self.frames: list[str] = []

    def offer(self, event: Event, ids: tuple[int, ...], data_json: str) -> bool:
        self.frames.append(postgres_changes_frame(TOPIC, ids, data_json, self.vsn))
        return True

    async def wait_offer(
        self, event: Event, ids: tuple[int, ...], data_json: str, timeout: float
    ) -> bool:
        return self.offer(event, ids, data_json)

    def close(self, reason: str) -> None:
        raise AssertionError(reason)


@pytest.mark.parametrize("list_first", [True, False])
def test_realtime_js_hands_each_binding_its_own_type_of_one_change(
    realtime_js: Path, list_first: bool
) -> None:
    """One channel, a status=eq.queued list (``*``) and an UPDATE binding; a request goes
    queued -> accepted. Through the router and a real RealtimeClient, the list gets a
    DELETE of the queued row and the UPDATE binding the accepted row, in either order."""
    js_bindings = [QUEUED_LIST, ALL_UPDATES] if list_first else [ALL_UPDATES, QUEUED_LIST]
    request: dict[str, Any] = {
        "vsn": VSN_2,
        "config": {},
        "bindings": js_bindings,
        "sends": [],
        "frames": [],
    }
    join_msg = decode(from_frame(run_node(CLIENT_SCRIPT, realtime_js, request)["sent"][0]), VSN_2)
    config = parse_join(join_msg.topic, join_msg.payload, ids_from(), TABLES)
    router = Router({"session_assignments": {"id": "uuid", "status": "text"}}, {})
    sink = FrameRecorder(VSN_2)
    bindings = tuple(Binding(b.id, b.table, b.event, b.filter) for b in config.bindings)
    router.add(Subscription(frozenset({"pool:general"}), bindings, sink, "test"))
    row_id = "5b2f0c3e-8f6a-4c1b-9e43-1d2c3b4a5f60"
    router.route(
        Event(
            id=1,
            at=datetime(2026, 1, 1, tzinfo=UTC),
            schema="public",
            table="session_assignments",
            type="UPDATE",
            row_id=row_id,
            record={"id": row_id, "status": "accepted"},
            old_record={"id": row_id, "status": "queued"},
            new_keys=frozenset({"pool:general"}),
            old_keys=frozenset({"pool:general"}),
        )
    )
    reply = reply_ok(join_msg.topic, join_msg.ref, join_msg.join_ref, join_reply_response(config))
    request["frames"] = [as_frame(encode(reply, VSN_2)), *(as_frame(f) for f in sink.frames)]
    out = run_node(CLIENT_SCRIPT, realtime_js, request)
    assert out["statuses"] == [["SUBSCRIBED", None]]
    got = {
        js_bindings[e["binding"]]["event"]: (
            e["payload"]["eventType"],
            e["payload"]["new"].get("status"),
            e["payload"]["old"].get("status"),
        )
        for e in out["events"]
        if e["kind"] == "postgres_changes"
    }
    assert len(got) == len([e for e in out["events"] if e["kind"] == "postgres_changes"])
    assert got == {"*": ("DELETE", None, "queued"), "UPDATE": ("UPDATE", "accepted", "queued")}
