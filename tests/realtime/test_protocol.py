"""The Supabase Realtime wire protocol, checked against the stock clients themselves.

The realtime-js checks run the npm package under node (installed once per machine into
``REALTIME_JS_CACHE``, keyed by ``REALTIME_JS_VERSION``); the Python checks drive the
installed ``realtime`` package.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import npm_cache
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from autodispatch.realtime.events import Event
from autodispatch.realtime.protocol import (
    RESUME_FROM_KEY,
    VSN_1,
    VSN_2,
    ChangeBinding,
    Filter,
    JoinConfig,
    Message,
    ProtocolError,
    broadcast,
    check_filter,
    columns_for,
    decode,
    encode,
    encode_json,
    encode_user_broadcast,
    encode_user_broadcast_push,
    heartbeat_reply,
    join_reply_response,
    matches,
    parse_filter,
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
from autodispatch.realtime.router import Binding, Router, Subscription

REALTIME_JS_VERSION = "2.109.0"
REALTIME_JS_CACHE = Path(os.environ.get("AUTODISPATCH_NPM_CACHE", "/tmp/autodispatch-npm-cache"))
TABLES = frozenset({"sessions", "session_assignments", "feature_flags"})
TOPIC = "realtime:dispatch"


def ids_from(start: int = 1) -> Callable[[], int]:
    counter = itertools.count(start)
    return lambda: next(counter)


def join(payload: dict[str, Any], topic: str = TOPIC) -> JoinConfig:
    return parse_join(topic, payload, ids_from(), TABLES)


def code_of(call: Callable[[], object]) -> str:
    with pytest.raises(ProtocolError) as info:
        call()
    return info.value.code


# --- strategies --------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=5)
refs = st.none() | st.text(min_size=1, max_size=10)
short_text = st.text(max_size=60)  # at most 240 UTF-8 bytes: fits a one-byte size field
messages = st.builds(Message, refs, refs, st.text(max_size=30), st.text(max_size=20), json_objects)


# --- frames ------------------------------------------------------------------------


def test_decode_v1_object_with_missing_refs() -> None:
    """A vsn 1.0.0 object frame without ref/join_ref decodes with both None."""
    msg = decode('{"topic":"phoenix","event":"heartbeat","payload":{}}', VSN_1)
    assert msg == Message(None, None, "phoenix", "heartbeat", {})


def test_decode_v1_reads_refs_and_integer_refs_as_strings() -> None:
    """vsn 1.0.0 refs are strings; an integer ref is read as its decimal string."""
    raw = '{"topic":"realtime:a","event":"phx_leave","payload":{},"ref":7,"join_ref":"3"}'
    assert decode(raw, VSN_1) == Message("3", "7", "realtime:a", "phx_leave", {})


def test_decode_v2_array() -> None:
    """A vsn 2.0.0 frame is [join_ref, ref, topic, event, payload]."""
    msg = decode('[null,"5","phoenix","heartbeat",{}]', VSN_2)
    assert msg == Message(None, "5", "phoenix", "heartbeat", {})


@pytest.mark.parametrize(
    ("raw", "vsn", "code"),
    [
        ("not json", VSN_1, "MalformedFrame"),
        ("[1,2", VSN_2, "MalformedFrame"),
        ('{"topic":"a","event":"b","payload":NaN}', VSN_1, "MalformedFrame"),
        ('["a","b","c","d",{}]', VSN_1, "MalformedFrame"),
        ('{"topic":"a","event":"b"}', VSN_1, "MalformedFrame"),
        ('{"topic":1,"event":"b","payload":{}}', VSN_1, "MalformedFrame"),
        ('{"topic":"a","event":"b","payload":[]}', VSN_1, "MalformedFrame"),
        ('{"topic":"a","event":"b","payload":{},"ref":true}', VSN_1, "MalformedFrame"),
        ('[null,null,"t","e"]', VSN_2, "MalformedFrame"),
        ('[null,null,"t","e",{},1]', VSN_2, "MalformedFrame"),
        ('{"topic":"a","event":"b","payload":{}}', VSN_2, "MalformedFrame"),
        ('[null,null,"t","e",null]', VSN_2, "MalformedFrame"),
        ("[]", "3.0.0", "UnsupportedVsn"),
        (b"\x03\x00\x00\x01\x01\x00\x01tex", VSN_1, "BinaryFrameUnsupported"),
        (b"", VSN_2, "MalformedFrame"),
        (b"\x00\x01\x01\x01\x01", VSN_2, "UnsupportedBinaryKind"),
        (b"\x02\x01\x01", VSN_2, "UnsupportedBinaryKind"),
        (b"\x03\x00\x00", VSN_2, "MalformedFrame"),
        (b"\x03\x00\x00\x09\x01\x00\x01tex", VSN_2, "MalformedFrame"),
        (b"\x03\x00\x00\x01\x01\x00\x07te{}", VSN_2, "MalformedFrame"),
        (b"\x03\x00\x00\x01\x01\x00\x01te{", VSN_2, "MalformedFrame"),
        (b"\x03\x00\x00\x01\x01\x00\x01te\xff", VSN_2, "MalformedFrame"),
        (b"\x03\x00\x00\x01\x01\x02\x01te[]{}", VSN_2, "MalformedFrame"),
    ],
)
def test_decode_rejects_garbage_with_a_code(raw: str | bytes, vsn: str, code: str) -> None:
    """Frames that are not what the clients send raise ProtocolError with a stable code."""
    assert code_of(lambda: decode(raw, vsn)) == code


@given(messages)
def test_encode_decode_round_trip_v1(msg: Message) -> None:
    """Every JSON message survives encode then decode under vsn 1.0.0."""
    assert decode(encode(msg, VSN_1), VSN_1) == msg


@given(messages)
def test_encode_decode_round_trip_v2(msg: Message) -> None:
    """Every JSON message survives encode then decode under vsn 2.0.0."""
    assert decode(encode(msg, VSN_2), VSN_2) == msg


@given(short_text, short_text, st.binary(max_size=64), st.none() | json_values)
def test_binary_broadcast_round_trip_kind_4(topic: str, event: str, data: bytes, meta: Any) -> None:
    """A broadcast with a bytes payload becomes a kind-4 frame that decodes back to it."""
    assume(meta is None or len(encode_json(meta)) <= 255)
    msg = broadcast(topic, event, data, meta=meta)
    frame = encode(msg, VSN_2)
    assert isinstance(frame, bytes)
    assert frame[0] == 4
    assert decode(frame, VSN_2) == msg


@given(
    refs,
    refs,
    short_text,
    short_text,
    json_values | st.binary(max_size=64),
    st.dictionaries(st.sampled_from(["meta", "private", "x"]), json_scalars, max_size=2),
)
def test_binary_broadcast_push_round_trip_kind_3(
    join_ref: str | None, ref: str | None, topic: str, event: str, data: Any, extra: Any
) -> None:
    """A kind-3 broadcast push (what realtime-js sends) decodes back to the message."""
    assume(len(encode_json(extra)) <= 255)
    payload = {"type": "broadcast", "event": event, "payload": data, **extra}
    msg = Message(join_ref, ref, topic, "broadcast", payload)
    assert decode(encode_user_broadcast_push(msg), VSN_2) == msg


def test_encode_v1_writes_ref_always_and_join_ref_only_when_set() -> None:
    """vsn 1.0.0 frames carry topic, event, payload and ref (null too); join_ref only if set."""
    plain = json.loads(encode(broadcast(TOPIC, "e", {}), VSN_1))
    assert list(plain) == ["topic", "event", "payload", "ref"]
    assert plain["ref"] is None
    reply = json.loads(encode(reply_ok(TOPIC, "2", "1", {}), VSN_1))
    assert reply["join_ref"] == "1"
    assert reply["ref"] == "2"


def test_encode_refuses_what_a_socket_cannot_carry() -> None:
    """Binary payloads on vsn 1.0.0, non-JSON payloads and oversized binary fields raise."""
    assert code_of(lambda: encode(broadcast(TOPIC, "e", b"\x00"), VSN_1)) == (
        "BinaryPayloadUnsupported"
    )
    assert code_of(lambda: encode(broadcast(TOPIC, "e", {"x": float("nan")}), VSN_1)) == (
        "UnencodableMessage"
    )
    assert code_of(lambda: encode(broadcast(TOPIC, "e", {"x": object()}), VSN_2)) == (
        "UnencodableMessage"
    )
    assert code_of(lambda: encode(broadcast("t" * 256, "e", b""), VSN_2)) == "UnencodableMessage"
    with_refs = Message("1", "2", TOPIC, "broadcast", {"event": "e", "payload": b""})
    assert code_of(lambda: encode(with_refs, VSN_2)) == "UnencodableMessage"
    assert code_of(lambda: encode(Message(None, None, "t", "e", {}), "0.1")) == "UnsupportedVsn"


def test_encode_user_broadcast_picks_text_for_json_and_kind_4_for_bytes() -> None:
    """JSON broadcasts go out as text arrays; bytes as kind 4 with the exact byte layout."""
    text = encode_user_broadcast(TOPIC, "ping", {"a": 1}, VSN_2)
    assert json.loads(text) == [
        None,
        None,
        TOPIC,
        "broadcast",
        {"type": "broadcast", "event": "ping", "payload": {"a": 1}},
    ]
    frame = encode_user_broadcast("realtime:x", "ev", b"\x01\x02", VSN_2, meta={"id": "m"})
    assert frame == b'\x04\x0a\x02\x0a\x00realtime:xev{"id":"m"}\x01\x02'


@given(st.text(max_size=30), st.lists(st.integers(1, 2**40), max_size=5), json_objects)
def test_postgres_changes_frame_equals_encode(topic: str, ids: list[int], data: Any) -> None:
    """The concatenated fast path equals encode() of the same message, in both vsns."""
    for vsn in (VSN_1, VSN_2):
        fast = postgres_changes_frame(topic, ids, encode_json(data), vsn)
        slow = encode(postgres_changes(topic, ids, data), vsn)
        assert json.loads(fast) == json.loads(slow)
        assert fast == slow
        assert decode(fast, vsn) == postgres_changes(topic, ids, data)


def test_postgres_changes_frame_checks_vsn() -> None:
    """The fast path refuses a vsn it does not speak."""
    assert code_of(lambda: postgres_changes_frame(TOPIC, [1], "{}", "9")) == "UnsupportedVsn"


# --- server messages ---------------------------------------------------------------


def test_server_message_builders_write_the_upstream_shapes() -> None:
    """Replies, system messages, close, presence and broadcasts have the upstream payloads."""
    assert reply_ok(TOPIC, "2", "1", {"postgres_changes": []}) == Message(
        "1", "2", TOPIC, "phx_reply", {"status": "ok", "response": {"postgres_changes": []}}
    )
    error = ProtocolError("UnknownTable", "table 'x' is not served")
    assert reply_error(TOPIC, "2", "1", error.reason).payload == {
        "status": "error",
        "response": {"reason": "UnknownTable: table 'x' is not served"},
    }
    assert system_subscribed(TOPIC).payload == {
        "extension": "postgres_changes",
        "status": "ok",
        "message": "Subscribed to PostgreSQL",
        "channel": "dispatch",
    }
    assert system_error(TOPIC, "system", "Token has expired").payload["channel"] == "dispatch"
    assert phx_close(TOPIC, "4") == Message("4", "4", TOPIC, "phx_close", {})
    assert presence_diff(TOPIC, {"a": {"metas": []}}, {}).payload == {
        "joins": {"a": {"metas": []}},
        "leaves": {},
    }
    assert broadcast(TOPIC, "e", {"x": 1}, meta={"id": "7"}).payload == {
        "type": "broadcast",
        "event": "e",
        "payload": {"x": 1},
        "meta": {"id": "7"},
    }
    assert heartbeat_reply("9") == Message(
        None, "9", "phoenix", "phx_reply", {"status": "ok", "response": {}}
    )


# --- join --------------------------------------------------------------------------

JS_JOIN: dict[str, Any] = {
    # What realtime-js 2.109.0 sends (see test_realtime_js_client_end_to_end); it adds
    # "version" when setAuth() changes the token after the channel was created.
    "config": {
        "broadcast": {"ack": False, "self": False},
        "presence": {"key": "", "enabled": False},
        "postgres_changes": [
            {"event": "*", "schema": "public", "table": "sessions"},
            {
                "event": "INSERT",
                "schema": "public",
                "table": "session_assignments",
                "filter": "status=eq.queued",
            },
        ],
        "private": False,
    },
    "access_token": "user-jwt",
    "version": "realtime-js/2.109.0",
}


def test_parse_join_reads_a_stock_join() -> None:
    """A realtime-js join becomes a JoinConfig with normalised bindings and ids in order."""
    config = join(JS_JOIN)
    assert config == JoinConfig(
        broadcast_self=False,
        broadcast_ack=False,
        presence_enabled=False,
        presence_key="",
        private=False,
        bindings=(
            ChangeBinding(
                1, "*", "public", "sessions", None, JS_JOIN["config"]["postgres_changes"][0]
            ),
            ChangeBinding(
                2,
                "INSERT",
                "public",
                "session_assignments",
                Filter("status", "eq", "queued"),
                JS_JOIN["config"]["postgres_changes"][1],
            ),
        ),
        access_token="user-jwt",
        resume_from=None,
    )


def test_parse_join_accepts_string_booleans_and_refuses_other_values() -> None:
    """Booleans may be "true"/"false" strings; anything else is InvalidJoinPayload."""
    config = join(
        {
            "config": {
                "broadcast": {"ack": "true", "self": "TRUE"},
                "presence": {"enabled": "false", "key": "me"},
                "private": "true",
            }
        }
    )
    assert (config.broadcast_ack, config.broadcast_self) == (True, True)
    assert (config.presence_enabled, config.presence_key, config.private) == (False, "me", True)
    bad = {"config": {"broadcast": {"ack": "yes"}}}
    assert code_of(lambda: join(bad)) == "InvalidJoinPayload"
    assert code_of(lambda: join({"config": {"private": 1}})) == "InvalidJoinPayload"
    assert code_of(lambda: join({"config": []})) == "InvalidJoinPayload"


def test_presence_key_ids_is_refused() -> None:
    """A presence key "ids" is refused at join and by presence_state (it breaks realtime-js)."""
    payload = {"config": {"presence": {"enabled": True, "key": "ids"}}}
    assert code_of(lambda: join(payload)) == "InvalidJoinPayload"
    with pytest.raises(ValueError, match="ids"):
        presence_state(TOPIC, {"ids": {"metas": []}})


def test_parse_join_defaults() -> None:
    """Without config, nothing is bound, presence is on (as upstream) and there is no token."""
    config = join({})
    assert config.bindings == ()
    assert config.presence_enabled is True
    assert (config.broadcast_ack, config.broadcast_self, config.private) == (False, False, False)
    assert config.access_token is None
    assert join({"access_token": ""}).access_token is None
    assert code_of(lambda: join({"access_token": 5})) == "InvalidJoinPayload"


def test_parse_join_normalises_bindings() -> None:
    """Event is upper-cased (unknown means '*'), schema defaults to public, no table means all."""
    raw = [
        {"event": "update", "table": "sessions"},
        {"event": "TRUNCATE", "schema": "public", "table": "*"},
        {"event": "delete"},
        {"table": "feature_flags", "filter": ""},
    ]
    config = join({"config": {"postgres_changes": raw}})
    assert [(b.event, b.schema, b.table, b.filter) for b in config.bindings] == [
        ("UPDATE", "public", "sessions", None),
        ("*", "public", "*", None),
        ("DELETE", "public", "*", None),
        ("*", "public", "feature_flags", None),
    ]


@pytest.mark.parametrize(
    ("entry", "code"),
    [
        ({"event": "*", "schema": "public", "table": "users"}, "UnknownTable"),
        ({"event": "*", "schema": "auth", "table": "sessions"}, "UnknownTable"),
        ({"event": "*", "table": "sessions", "filter": "status=like.q%"}, "InvalidFilter"),
        ({"event": "*", "table": "sessions", "filter": 3}, "InvalidFilter"),
        ({"event": 1, "table": "sessions"}, "InvalidJoinPayload"),
        ("sessions", "InvalidJoinPayload"),
    ],
)
def test_parse_join_refuses_bad_bindings(entry: Any, code: str) -> None:
    """Unknown tables, other schemas, bad filters and malformed entries are refused by code."""
    assert code_of(lambda: join({"config": {"postgres_changes": [entry]}})) == code


def test_parse_join_topic_rules() -> None:
    """Topics start with realtime:, and the bare prefix is TopicNameRequired."""
    assert code_of(lambda: join({}, topic="realtime:")) == "TopicNameRequired"
    assert code_of(lambda: join({}, topic="room:1")) == "UnmatchedTopic"


def test_parse_join_assigns_ids_only_for_valid_joins() -> None:
    """next_id runs once per binding in order, never for a refused join, and never returns 0."""
    calls: list[int] = []

    def next_id() -> int:
        calls.append(len(calls) + 10)
        return calls[-1]

    bad = {"config": {"postgres_changes": [{"table": "sessions"}, {"table": "nope"}]}}
    with pytest.raises(ProtocolError):
        parse_join(TOPIC, bad, next_id, TABLES)
    assert calls == []
    config = parse_join(TOPIC, JS_JOIN, next_id, TABLES)
    assert [b.id for b in config.bindings] == [10, 11]
    with pytest.raises(ValueError, match="positive"):
        parse_join(TOPIC, JS_JOIN, lambda: 0, TABLES)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({RESUME_FROM_KEY: 42}, 42),
        ({RESUME_FROM_KEY: "42"}, 42),
        ({"config": {RESUME_FROM_KEY: "7"}}, 7),
        ({RESUME_FROM_KEY: 7, "config": {RESUME_FROM_KEY: 7}}, 7),
        ({RESUME_FROM_KEY: 0}, 0),
        ({RESUME_FROM_KEY: None}, None),
    ],
)
def test_parse_join_reads_resume_from(payload: dict[str, Any], expected: int | None) -> None:
    """The resume cursor is read at the top level or in config, as an int or digit string."""
    assert join(payload).resume_from == expected


@pytest.mark.parametrize("value", [True, -1, 1.5, "12a", "", "١٢", 2**63, [1]])
def test_parse_join_refuses_bad_resume_from(value: Any) -> None:
    """A resume cursor that is not a non-negative bigint is InvalidJoinPayload."""
    assert code_of(lambda: join({RESUME_FROM_KEY: value})) == "InvalidJoinPayload"


def test_parse_join_refuses_conflicting_resume_from() -> None:
    """Two different cursors in one join are refused rather than guessed between."""
    payload = {RESUME_FROM_KEY: 1, "config": {RESUME_FROM_KEY: 2}}
    assert code_of(lambda: join(payload)) == "InvalidJoinPayload"


def test_parse_join_checks_filters_against_columns() -> None:
    """With table_columns, a filter on a missing column or with a bad value is refused."""
    columns = {"sessions": {"id": "uuid", "status": "session_status", "price": "numeric"}}

    def with_filter(text: str) -> JoinConfig:
        payload = {"config": {"postgres_changes": [{"table": "sessions", "filter": text}]}}
        return parse_join(TOPIC, payload, ids_from(), TABLES, table_columns=columns)

    assert with_filter("price=gt.10").bindings[0].filter == Filter("price", "gt", "10")
    assert code_of(lambda: with_filter("nope=eq.1")) == "InvalidFilter"
    assert code_of(lambda: with_filter("id=eq.42")) == "InvalidFilter"
    assert code_of(lambda: with_filter("status=lt.open")) == "InvalidFilter"


def test_join_reply_echoes_entries_in_order_with_ids() -> None:
    """The reply lists each entry exactly as sent (absent keys stay absent) plus its id."""
    raw = [
        {"event": "insert", "schema": "public", "table": "sessions", "select": ["id"]},
        {"event": "*", "schema": "public"},
    ]
    response = join_reply_response(join({"config": {"postgres_changes": raw}}))
    assert response == {
        "postgres_changes": [
            {"event": "insert", "schema": "public", "table": "sessions", "select": ["id"], "id": 1},
            {"event": "*", "schema": "public", "id": 2},
        ]
    }
    assert all(type(entry["id"]) is int for entry in response["postgres_changes"])


# --- filters -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("id=eq.5", Filter("id", "eq", "5")),
        ("status=neq.done", Filter("status", "neq", "done")),
        ("at=gte.2026-01-01T00:00:00+00:00", Filter("at", "gte", "2026-01-01T00:00:00+00:00")),
        ("n=lt.-1.5", Filter("n", "lt", "-1.5")),
        ("name=eq.", Filter("name", "eq", "")),
        ("note=eq.a=b", Filter("note", "eq", "a=b")),
        ('name=eq."a,b"', Filter("name", "eq", "a,b")),
        ('name=eq."say \\"hi\\" \\\\ there"', Filter("name", "eq", 'say "hi" \\ there')),
        ("status=in.(queued,offered)", Filter("status", "in", ("queued", "offered"))),
        ("status=in.( a , b )", Filter("status", "in", ("a", "b"))),
        ('status=in.("a,b", "c)",d)', Filter("status", "in", ("a,b", "c)", "d"))),
    ],
)
def test_parse_filter_reads_supported_forms(text: str, expected: Filter) -> None:
    """column=op.value for eq/neq/lt/lte/gt/gte/in, with PostgREST quoting."""
    assert parse_filter(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "status",
        "=eq.1",
        "status=queued",
        "status=like.q%",
        "status=ilike.q%",
        "deleted_at=is.null",
        "status=not.eq.done",
        "status=between.1",
        "a=eq.1,b=eq.2",
        'a=eq."x"y',
        'a=eq."open',
        "a=in.()",
        "a=in.(1,2",
        "a=in.1,2",
        "a=in.(1),b=eq.2",
        'a=in.(x"y)',
        "a=in.(" + ",".join(map(str, range(101))) + ")",
    ],
)
def test_parse_filter_refuses_what_it_cannot_serve(text: str) -> None:
    """Malformed filters, unsupported operators, AND-ing and over 100 values are InvalidFilter."""
    assert code_of(lambda: parse_filter(text)) == "InvalidFilter"


def test_parse_filter_takes_exactly_100_values() -> None:
    """An in list of 100 values is accepted."""
    f = parse_filter("a=in.(" + ",".join(map(str, range(100))) + ")")
    assert len(f.value) == 100


def js_quote(value: str) -> str:
    """realtime-js RealtimePostgresFilterBuilder's serializeScalar, in Python."""
    if any(c in value for c in ',()"\\') or value != value.strip():
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


@given(st.text(min_size=1))
def test_parse_filter_reads_js_builder_quoting_for_eq(value: str) -> None:
    """Any value quoted as realtime-js's builder quotes it parses back to itself."""
    assert parse_filter("c=eq." + js_quote(value)).value == value


@given(st.lists(st.text(min_size=1).filter(lambda v: v == v.strip()), min_size=1, max_size=8))
def test_parse_filter_reads_js_builder_quoting_for_in(values: list[str]) -> None:
    """Any in list written by realtime-js's builder parses back to its values."""
    values = list(dict.fromkeys(values))  # the builder de-duplicates
    text = "c=in.(" + ",".join(js_quote(v) for v in values) + ")"
    assert parse_filter(text).value == tuple(values)


TYPES = {
    "id": "uuid",
    "n": "int4",
    "price": "numeric",
    "ok": "bool",
    "at": "timestamptz",
    "local": "timestamp",
    "day": "date",
    "name": "text",
    "doc": "jsonb",
    "status": "session_status",
    "tags": "_text",
}


@pytest.mark.parametrize(
    ("text", "record", "expected"),
    [
        ("n=gt.9", {"n": 10}, True),
        ("n=gt.9", {"n": "10"}, True),
        ("n=lt.9", {"n": 10}, False),
        ("n=eq.10", {"n": 10.0}, True),
        ("n=eq.x", {"n": 10}, False),
        ("price=gte.12.5", {"price": "12.50"}, True),
        ("price=eq.NaN", {"price": "NaN"}, True),
        ("price=gt.1e9", {"price": "NaN"}, True),
        ("ok=eq.true", {"ok": True}, True),
        ("ok=eq.f", {"ok": "f"}, True),
        ("ok=neq.true", {"ok": False}, True),
        ("at=gt.2026-01-01 10:00:00+00", {"at": "2026-01-01T11:00:00+01:00"}, False),
        ("at=eq.2026-01-01 10:00:00+00", {"at": "2026-01-01T11:00:00+01:00"}, True),
        ("at=lt.2026-01-01T10:00:01Z", {"at": "2026-01-01T10:00:00"}, True),
        ("local=eq.2026-01-01T10:00:00", {"local": "2026-01-01 10:00:00"}, True),
        ("day=lt.2026-02-01", {"day": "2026-01-31"}, True),
        (
            "id=eq.5B2F0C3E-8F6A-4C1B-9E43-1D2C3B4A5F60",
            {"id": "5b2f0c3e-8f6a-4c1b-9e43-1d2c3b4a5f60"},
            True,
        ),
        ("id=eq.not-a-uuid", {"id": "5b2f0c3e-8f6a-4c1b-9e43-1d2c3b4a5f60"}, False),
        ("name=lt.b", {"name": "a"}, True),
        ("name=lt.B", {"name": "a"}, False),
        ('doc=eq."{\\"b\\":1.0,\\"a\\":[true]}"', {"doc": {"a": [True], "b": 1}}, True),
        ('doc=eq.{"a":[1]}', {"doc": {"a": [True]}}, False),
        ("doc=gt.1", {"doc": 2}, False),
        ("status=in.(queued,offered)", {"status": "offered"}, True),
        ("status=neq.queued", {"status": "offered"}, True),
        ("status=lt.z", {"status": "offered"}, False),
        ("tags=eq.{a}", {"tags": ["a"]}, False),
        ("n=in.(1,x,3)", {"n": 3}, True),
        ("name=eq.null", {"name": None}, False),
        ("name=neq.x", {"name": None}, False),
        ("name=eq.null", {"name": "null"}, True),
        ("missing=neq.x", {"name": "a"}, False),
        ("untyped=eq.5", {"untyped": 5}, True),
        ("untyped=gt.4", {"untyped": 5}, True),
        ("untyped=eq.true", {"untyped": True}, True),
    ],
)
def test_matches_compares_as_the_column_type(
    text: str, record: dict[str, Any], expected: bool
) -> None:
    """Filters compare as the PostgreSQL type; nulls, missing columns and bad literals fail."""
    assert matches(parse_filter(text), record, TYPES) is expected


@given(st.sampled_from(["eq", "neq", "lt", "lte", "gt", "gte"]), st.integers(), st.integers())
def test_matches_integers_like_python(op: str, value: int, literal: int) -> None:
    """Integer filters agree with integer comparison for any values."""
    expected = {
        "eq": value == literal,
        "neq": value != literal,
        "lt": value < literal,
        "lte": value <= literal,
        "gt": value > literal,
        "gte": value >= literal,
    }[op]
    assert matches(Filter("n", op, str(literal)), {"n": value}, {"n": "int8"}) is expected
    assert matches(Filter("n", op, str(literal)), {"n": str(value)}, {"n": "int8"}) is expected


@given(
    st.sampled_from(["eq", "neq", "lt", "lte", "gt", "gte"]),
    st.decimals(allow_nan=False, allow_infinity=False, places=3),
    st.decimals(allow_nan=False, allow_infinity=False, places=3),
)
def test_matches_numerics_like_decimal(op: str, value: Decimal, literal: Decimal) -> None:
    """numeric filters compare by value, not by text ("10.50" > "9.9")."""
    expected = {
        "eq": value == literal,
        "neq": value != literal,
        "lt": value < literal,
        "lte": value <= literal,
        "gt": value > literal,
        "gte": value >= literal,
    }[op]
    f = parse_filter(f"p={op}.{literal}")
    assert matches(f, {"p": str(value)}, {"p": "numeric"}) is expected


@given(st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=5), st.text(max_size=5))
def test_matches_in_is_membership(values: list[str], value: str) -> None:
    """in matches exactly the records whose text value is one of the listed values."""
    f = Filter("s", "in", tuple(values))
    assert matches(f, {"s": value}, {"s": "text"}) is (value in values)


def test_check_filter_refuses_what_postgres_would() -> None:
    """check_filter raises InvalidFilter for unknown columns, bad literals and unordered types."""
    check_filter(parse_filter("n=in.(1,2)"), TYPES)
    check_filter(parse_filter("status=eq.whatever"), TYPES)
    for text in ("nope=eq.1", "n=eq.1.5", "ok=eq.maybe", "at=gt.yesterday", "doc=lt.1", "doc=eq.{"):
        with pytest.raises(ProtocolError) as info:
            check_filter(parse_filter(text), TYPES)
        assert info.value.code == "InvalidFilter", text


def test_columns_for_lists_record_columns_with_types() -> None:
    """columns_for gives [{name, type}] in record order, typed from the table or the value."""
    record = {"id": "x", "n": 1, "extra": {"a": 1}, "flag": True, "ratio": 0.5, "s": "t"}
    assert columns_for(record, {"id": "uuid", "n": "int4"}) == [
        {"name": "id", "type": "uuid"},
        {"name": "n", "type": "int4"},
        {"name": "extra", "type": "jsonb"},
        {"name": "flag", "type": "bool"},
        {"name": "ratio", "type": "float8"},
        {"name": "s", "type": "text"},
    ]


# --- the Python client (realtime on PyPI) ------------------------------------------

realtime_message = pytest.importorskip(
    "realtime.message", reason="the Python `realtime` client is not installed in this venv"
)


def python_client_parses(frame: str | bytes) -> Any:
    """What the Python client's socket loop makes of a frame (it raises if it drops it)."""
    return realtime_message.ServerMessageAdapter.validate_json(frame)


def row_data(**overrides: Any) -> dict[str, Any]:
    record = {"id": "5b2f0c3e-8f6a-4c1b-9e43-1d2c3b4a5f60", "status": "queued"}
    data: dict[str, Any] = {
        "schema": "public",
        "table": "session_assignments",
        "commit_timestamp": "2026-01-01T00:00:00Z",
        "type": "INSERT",
        "columns": columns_for(record, {"id": "uuid", "status": "assignment_status"}),
        "record": record,
        "errors": None,
        "event_id": 41,
    }
    data.update(overrides)
    return data


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
