"""The wire protocol's frames (vsn 1 and 2, binary broadcasts) and server messages, as the
stock clients write and read them.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from protocol_helpers import (
    TOPIC,
    code_of,
    json_objects,
    json_scalars,
    json_values,
    messages,
    refs,
    short_text,
)

from autodispatch.realtime.protocol import (
    VSN_1,
    VSN_2,
    Message,
    ProtocolError,
    broadcast,
    decode,
    encode,
    encode_json,
    encode_user_broadcast,
    encode_user_broadcast_push,
    heartbeat_reply,
    phx_close,
    postgres_changes,
    postgres_changes_frame,
    presence_diff,
    reply_error,
    reply_ok,
    system_error,
    system_subscribed,
)

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
