"""The Supabase Realtime wire protocol: frames, join configs, row filters, server messages.

Pure: no I/O, no clock, no randomness. The transports decode what a socket received,
the router builds what it sends; everything about the bytes on the wire lives here. That
is why it is one module of ~670 lines: the wire is one contract with the stock clients,
pinned point by point below and in ``tests/realtime/test_protocol_*.py``, and a change to
one frame must be read beside the others.

Ground truth is the stock clients' own source, read for this module:

- ``@supabase/realtime-js`` 2.109.0 (npm) with ``@supabase/phoenix`` 0.4.4:
  ``RealtimeClient``, ``RealtimeChannel``, ``lib/serializer``, ``lib/constants``,
  ``lib/transformers``, ``RealtimePostgresFilterBuilder``; phoenix ``socket``,
  ``channel``, ``push``.
- ``realtime`` 2.34.1 (PyPI): ``_async/client.py``, ``_async/channel.py``,
  ``_async/push.py``, ``message.py``, ``types.py``.

What a server must respect (each point is pinned by a test in
``tests/realtime/test_protocol_*.py``, most of them against the real clients):

- vsn 1.0.0 frames are JSON objects. The Python client validates every server frame
  with pydantic and *drops* one whose ``ref`` key is missing (``ref: Literal[None]`` is
  a required field), so ``encode`` always writes ``topic, event, payload, ref``; it adds
  ``join_ref`` only when it is set (realtime-js uses it to drop messages of an old join,
  the Python client ignores it). The Python client (2.34.1) does send ``vsn=1.0.0`` and
  a ``join_ref`` on its pushes; its heartbeats carry ``ref: null``.
- vsn 2.0.0 text frames are ``[join_ref, ref, topic, event, payload]``. realtime-js
  sends *every* channel broadcast as a binary kind-3 frame (JSON payloads too, with
  encoding byte 1) and decodes binary kind 4 only: any other binary kind makes its
  decoder return ``undefined`` and the socket's message handler throw. Text arrays work
  for broadcasts too, so binary kind 4 is only needed for binary (``bytes``) payloads.
  realtime-js writes kind-3 header strings one byte per UTF-16 unit (``charCodeAt``), so
  Latin-1 characters arrive as single bytes and anything above U+00FF is mangled by the
  client itself; ``decode`` reads header strings as UTF-8 and falls back to Latin-1.
- The ok join reply must list the ``postgres_changes`` entries in request order with
  the same ``event``/``schema``/``table``/``filter`` (realtime-js: ``===`` after mapping
  null to undefined, so ``""`` is not absent; Python: ``==``), each with an integer ``id``
  that is never 0 (both clients test the id for truthiness). Python also validates
  ``event`` against ``*``/``INSERT``/``UPDATE``/``DELETE``. ``join_reply_response``
  echoes each entry exactly as sent, plus its id.
- A row event reaches a binding only if the binding's id is in ``payload.ids`` and its
  event is ``*`` or ``data.type``. Neither client de-duplicates: two frames, two calls.
- Python's ``data`` schema: ``schema, table, commit_timestamp, type, columns, errors``
  required, ``record`` a dict or null, ``old_record`` a dict if present (never null).
  Unknown keys of ``payload`` and ``data`` are dropped by Python and ignored by
  realtime-js, so an extra key there (our event id) is delivered but invisible to callbacks.
- ``system`` payloads need ``channel`` as well as ``extension, status, message``, or
  Python drops them. Python treats a ``system`` error as a channel error and rejoins.
- ``phx_close`` carries the join's ``join_ref`` as both ``join_ref`` and ``ref`` (as
  Phoenix does): realtime-js ignores a close whose refs are not those of its current join.
- realtime-js reshapes *any* payload with a top-level ``ids`` key as a row event and
  throws when it has no ``data``: so no server payload but ``postgres_changes`` may have
  one, and a presence key ``"ids"`` (a top-level key of ``presence_state``) is refused.

Our extension, invisible to stock servers and sent by no stock client:
``RESUME_FROM_KEY`` (``"autodispatch_resume_from"``), the last event id the client has
seen, as an int or a digit string. Neither stock client forwards unknown ``config`` keys
(both rebuild ``config`` from broadcast, presence, postgres_changes, private), but both keep
unknown *top-level* join payload keys across rejoins: realtime-js via
``channel.updateJoinPayload({autodispatch_resume_from: n})``, Python via
``client.channel(name, {"config": ..., "autodispatch_resume_from": n})`` or
``channel.join_push.update_payload(...)``. So it is read at the top level of the join
payload, and also from ``config`` for clients of our own.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

# Filters and the error type are part of the protocol's surface: re-exported here.
from autodispatch.realtime.errors import ProtocolError as ProtocolError
from autodispatch.realtime.filters import FILTER_OPS as FILTER_OPS
from autodispatch.realtime.filters import MAX_IN_VALUES as MAX_IN_VALUES
from autodispatch.realtime.filters import Filter as Filter
from autodispatch.realtime.filters import check_filter as check_filter
from autodispatch.realtime.filters import matches as matches
from autodispatch.realtime.filters import parse_filter as parse_filter
from autodispatch.realtime.filters import reject_json_constant

VSN_1: Final = "1.0.0"
VSN_2: Final = "2.0.0"
VSNS: Final = frozenset({VSN_1, VSN_2})

TOPIC_PREFIX: Final = "realtime:"
RESUME_FROM_KEY: Final = "autodispatch_resume_from"
SERVED_SCHEMA: Final = "public"
ALL_TABLES: Final = "*"
CHANGE_EVENTS: Final = frozenset({"*", "INSERT", "UPDATE", "DELETE"})


_KIND_USER_BROADCAST_PUSH: Final = 3
_KIND_USER_BROADCAST: Final = 4
_ENCODING_BINARY: Final = 0
_ENCODING_JSON: Final = 1
_MAX_FIELD: Final = 255  # every size field of a binary frame is one byte
_BROADCAST_KEYS: Final = frozenset({"type", "event", "payload"})
_MAX_EVENT_ID: Final = 2**63 - 1  # bigint
_IDS: Final = "ids"  # realtime-js takes any payload with this key for a row event


@dataclass(frozen=True, slots=True)
class Message:
    """One Phoenix message. A binary user broadcast's payload is still a dict:
    ``{"type": "broadcast", "event": <user event>, "payload": <JSON value or bytes>}``
    (plus ``"meta"`` when the frame carries metadata)."""

    join_ref: str | None
    ref: str | None
    topic: str
    event: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ChangeBinding:
    """One ``postgres_changes`` entry of a join, normalised; ``raw`` is what the client sent."""

    id: int
    event: str  # '*', 'INSERT', 'UPDATE', 'DELETE'
    schema: str
    table: str  # a known table, or '*' for all of them
    filter: Filter | None
    raw: dict[str, Any]


@dataclass(frozen=True, slots=True)
class JoinConfig:
    """What a ``phx_join`` asks for. ``presence_key`` is ``""`` when the client left the
    choice to the server (upstream then uses a fresh UUID per join)."""

    broadcast_self: bool
    broadcast_ack: bool
    presence_enabled: bool
    presence_key: str
    private: bool
    bindings: tuple[ChangeBinding, ...]
    access_token: str | None
    resume_from: int | None


# --- JSON --------------------------------------------------------------------------


# One encoder for every frame: ``json.dumps`` with options builds a new one per call.
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def encode_json(value: Any) -> str:
    """JSON as every frame here is written: compact, ASCII only (so a lone surrogate
    cannot make a text frame invalid UTF-8) and without NaN/Infinity (``JSON.parse``
    refuses them). Use it for the ``data_json`` of ``postgres_changes_frame``."""
    return _ENCODER.encode(value)


def _loads(text: str, what: str) -> Any:
    try:
        return json.loads(text, parse_constant=reject_json_constant)
    except ValueError as exc:  # JSONDecodeError is a ValueError
        raise ProtocolError("MalformedFrame", f"{what} is not valid JSON ({exc})") from None


def _check_vsn(vsn: str) -> None:
    if vsn not in VSNS:
        raise ProtocolError(
            "UnsupportedVsn", f"vsn {vsn!r} is not supported; use {VSN_1} or {VSN_2}"
        )


# --- decode ------------------------------------------------------------------------


def decode(raw: str | bytes, vsn: str) -> Message:
    """A client frame as a ``Message``: ``str`` is a text frame, ``bytes`` a binary one.

    vsn 1.0.0 takes JSON objects (``ref``/``join_ref`` may be null or missing); vsn
    2.0.0 takes ``[join_ref, ref, topic, event, payload]`` arrays and binary user
    broadcasts: kind 3 (what realtime-js sends) and kind 4 (what ``encode`` writes).
    """
    _check_vsn(vsn)
    if isinstance(raw, bytes):
        if vsn == VSN_1:
            raise ProtocolError(
                "BinaryFrameUnsupported", f"binary frames need vsn={VSN_2}; send JSON text"
            )
        return _decode_binary(raw)
    value = _loads(raw, "the frame")
    if vsn == VSN_1:
        if not isinstance(value, dict):
            raise ProtocolError(
                "MalformedFrame", "a vsn 1.0.0 frame is a JSON object with topic, event, payload"
            )
        if "payload" not in value:
            raise ProtocolError("MalformedFrame", "the frame has no payload")
        return _message(
            value.get("join_ref"),
            value.get("ref"),
            value.get("topic"),
            value.get("event"),
            value["payload"],
        )
    if not isinstance(value, list) or len(value) != 5:
        raise ProtocolError(
            "MalformedFrame", "a vsn 2.0.0 frame is [join_ref, ref, topic, event, payload]"
        )
    return _message(*value)


def _ref(value: Any, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ProtocolError("MalformedFrame", f"{name} must be a string or null, got {value!r}")


def _message(join_ref: Any, ref: Any, topic: Any, event: Any, payload: Any) -> Message:
    if not isinstance(topic, str):
        raise ProtocolError("MalformedFrame", f"topic must be a string, got {topic!r}")
    if not isinstance(event, str):
        raise ProtocolError("MalformedFrame", f"event must be a string, got {event!r}")
    if not isinstance(payload, dict):
        raise ProtocolError("MalformedFrame", "payload must be a JSON object")
    return Message(_ref(join_ref, "join_ref"), _ref(ref, "ref"), topic, event, payload)


def _header_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        # realtime-js writes one byte per UTF-16 unit: Latin-1 for U+0000..U+00FF.
        return data.decode("latin-1")


def _decode_binary(frame: bytes) -> Message:
    if not frame:
        raise ProtocolError("MalformedFrame", "empty binary frame")
    kind = frame[0]
    names: tuple[str, ...]
    if kind == _KIND_USER_BROADCAST_PUSH:
        header = 7
        names = ("join_ref", "ref", "topic", "event", "metadata")
    elif kind == _KIND_USER_BROADCAST:
        header = 5
        names = ("topic", "event", "metadata")
    else:
        raise ProtocolError(
            "UnsupportedBinaryKind",
            f"binary frame kind {kind} is not accepted; send kind 3 (user broadcast push)",
        )
    if len(frame) < header:
        raise ProtocolError("MalformedFrame", f"binary frame of kind {kind} is truncated")
    sizes = frame[1 : header - 1]
    encoding = frame[header - 1]
    fields: dict[str, bytes] = {}
    offset = header
    for name, size in zip(names, sizes, strict=True):
        if offset + size > len(frame):
            raise ProtocolError("MalformedFrame", f"binary frame is truncated in its {name}")
        fields[name] = frame[offset : offset + size]
        offset += size
    body = frame[offset:]
    user_payload: Any
    if encoding == _ENCODING_BINARY:
        user_payload = body
    elif encoding == _ENCODING_JSON:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("MalformedFrame", "JSON payload is not UTF-8") from None
        user_payload = _loads(text, "the broadcast payload")
    else:
        raise ProtocolError("MalformedFrame", f"unknown payload encoding {encoding}")
    payload: dict[str, Any] = {
        "type": "broadcast",
        "event": _header_text(fields["event"]),
        "payload": user_payload,
    }
    topic = _header_text(fields["topic"])
    metadata = fields["metadata"]
    if kind == _KIND_USER_BROADCAST:
        if metadata:
            payload["meta"] = _loads(_header_text(metadata), "the broadcast metadata")
        return Message(None, None, topic, "broadcast", payload)
    if metadata:
        # realtime-js picks these keys from the broadcast payload; put them back.
        extra = _loads(_header_text(metadata), "the broadcast metadata")
        if not isinstance(extra, dict):
            raise ProtocolError("MalformedFrame", "broadcast metadata must be a JSON object")
        payload.update({k: v for k, v in extra.items() if k not in _BROADCAST_KEYS})
    join_ref = _header_text(fields["join_ref"]) or None
    ref = _header_text(fields["ref"]) or None
    return Message(join_ref, ref, topic, "broadcast", payload)


# --- encode ------------------------------------------------------------------------


def _is_binary_broadcast(msg: Message) -> bool:
    return msg.event == "broadcast" and isinstance(msg.payload.get("payload"), bytes)


def encode(msg: Message, vsn: str) -> str | bytes:
    """A server frame: text (JSON) always, except a broadcast with a ``bytes`` payload,
    which becomes a binary kind-4 frame under vsn 2.0.0 and cannot be sent under 1.0.0."""
    _check_vsn(vsn)
    if _is_binary_broadcast(msg):
        if vsn == VSN_1:
            raise ProtocolError(
                "BinaryPayloadUnsupported", "a vsn 1.0.0 socket cannot carry binary payloads"
            )
        return _encode_user_broadcast(msg)
    value: Any
    if vsn == VSN_1:
        value = {"topic": msg.topic, "event": msg.event, "payload": msg.payload, "ref": msg.ref}
        if msg.join_ref is not None:
            value["join_ref"] = msg.join_ref
    else:
        value = [msg.join_ref, msg.ref, msg.topic, msg.event, msg.payload]
    try:
        return encode_json(value)
    except (TypeError, ValueError) as exc:
        raise ProtocolError("UnencodableMessage", f"the payload is not JSON ({exc})") from None


def _field(text: str, name: str) -> bytes:
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError("UnencodableMessage", f"{name} is not valid Unicode") from None
    if len(data) > _MAX_FIELD:
        raise ProtocolError(
            "UnencodableMessage",
            f"{name} is {len(data)} bytes; a binary frame allows {_MAX_FIELD}",
        )
    return data


def _broadcast_parts(msg: Message) -> tuple[bytes, bytes, dict[str, Any]]:
    event = msg.payload.get("event")
    if not isinstance(event, str):
        raise ProtocolError("UnencodableMessage", "a broadcast needs a string 'event'")
    if msg.payload.get("type", "broadcast") != "broadcast":
        raise ProtocolError("UnencodableMessage", "a broadcast payload has type 'broadcast'")
    extra = {k: v for k, v in msg.payload.items() if k not in _BROADCAST_KEYS}
    return _field(msg.topic, "topic"), _field(event, "event"), extra


def _user_payload(value: Any) -> tuple[int, bytes]:
    if isinstance(value, bytes):
        return _ENCODING_BINARY, value
    try:
        return _ENCODING_JSON, encode_json(value).encode("ascii")
    except (TypeError, ValueError) as exc:
        raise ProtocolError("UnencodableMessage", f"the payload is not JSON ({exc})") from None


def _encode_user_broadcast(msg: Message) -> bytes:
    if msg.join_ref is not None or msg.ref is not None:
        raise ProtocolError("UnencodableMessage", "a binary broadcast (kind 4) carries no refs")
    topic, event, extra = _broadcast_parts(msg)
    meta = b""
    if "meta" in extra:
        meta = _field(encode_json(extra.pop("meta")), "metadata")
    if extra:
        raise ProtocolError(
            "UnencodableMessage", f"a binary broadcast cannot carry keys {sorted(extra)}"
        )
    encoding, body = _user_payload(msg.payload["payload"])
    header = bytes((_KIND_USER_BROADCAST, len(topic), len(event), len(meta), encoding))
    return header + topic + event + meta + body


def encode_user_broadcast_push(msg: Message) -> bytes:
    """The binary kind-3 frame realtime-js sends for ``channel.send({type: 'broadcast'})``,
    for our own test clients. Keys beyond type/event/payload travel as metadata. Strings
    are written as UTF-8 (realtime-js writes Latin-1); ``decode`` reads both."""
    if msg.event != "broadcast":
        raise ProtocolError("UnencodableMessage", "only broadcasts have a binary push form")
    topic, event, extra = _broadcast_parts(msg)
    join_ref = _field(msg.join_ref or "", "join_ref")
    ref = _field(msg.ref or "", "ref")
    meta = _field(encode_json(extra), "metadata") if extra else b""
    encoding, body = _user_payload(msg.payload.get("payload", {}))
    sizes = (len(join_ref), len(ref), len(topic), len(event), len(meta), encoding)
    return bytes((_KIND_USER_BROADCAST_PUSH, *sizes)) + join_ref + ref + topic + event + meta + body


def encode_user_broadcast(
    topic: str, event: str, payload: Any, vsn: str, *, meta: Any = None
) -> str | bytes:
    """A user broadcast for a subscriber: a text frame for JSON payloads (realtime-js
    decodes text arrays for broadcasts as well), a binary kind-4 frame for ``bytes``
    under vsn 2.0.0; ``bytes`` under vsn 1.0.0 raise ``BinaryPayloadUnsupported``."""
    return encode(broadcast(topic, event, payload, meta=meta), vsn)


def postgres_changes_frame(topic: str, ids: Sequence[int], data_json: str, vsn: str) -> str:
    """The ``postgres_changes`` frame, built around ``data_json`` (one event's ``data``,
    encoded once with ``encode_json`` and shared by every recipient). Equal to
    ``encode(postgres_changes(topic, ids, data), vsn)`` when ``data_json`` is
    ``encode_json(data)``."""
    _check_vsn(vsn)
    payload = '{"ids":' + encode_json(list(ids)) + ',"data":' + data_json + "}"
    if vsn == VSN_1:
        return (
            '{"topic":'
            + encode_json(topic)
            + ',"event":"postgres_changes","payload":'
            + payload
            + ',"ref":null}'
        )
    return "[null,null," + encode_json(topic) + ',"postgres_changes",' + payload + "]"


# --- server messages ---------------------------------------------------------------


def channel_name(topic: str) -> str:
    """The name in ``realtime:<name>``; raises ``TopicNameRequired``/``UnmatchedTopic``."""
    if not topic.startswith(TOPIC_PREFIX):
        raise ProtocolError("UnmatchedTopic", f"topics start with {TOPIC_PREFIX!r}: {topic!r}")
    name = topic[len(TOPIC_PREFIX) :]
    if not name:
        raise ProtocolError("TopicNameRequired", "You must provide a topic name")
    return name


def reply_ok(
    topic: str, ref: str | None, join_ref: str | None, response: dict[str, Any]
) -> Message:
    return Message(join_ref, ref, topic, "phx_reply", {"status": "ok", "response": response})


def reply_error(topic: str, ref: str | None, join_ref: str | None, reason: str) -> Message:
    """An error reply; ``reason`` is ``"Code: message"`` (``ProtocolError.reason``)."""
    payload = {"status": "error", "response": {"reason": reason}}
    return Message(join_ref, ref, topic, "phx_reply", payload)


def heartbeat_reply(ref: str | None) -> Message:
    return reply_ok("phoenix", ref, None, {})


def _system(topic: str, extension: str, status: str, message: str) -> Message:
    payload = {
        "extension": extension,
        "status": status,
        "message": message,
        "channel": topic.removeprefix(TOPIC_PREFIX),
    }
    return Message(None, None, topic, "system", payload)


def system_subscribed(topic: str) -> Message:
    return _system(topic, "postgres_changes", "ok", "Subscribed to PostgreSQL")


def system_error(topic: str, extension: str, message: str) -> Message:
    """A ``system`` error, e.g. extension ``"system"`` before closing an expired channel."""
    return _system(topic, extension, "error", message)


def phx_close(topic: str, join_ref: str | None) -> Message:
    return Message(join_ref, join_ref, topic, "phx_close", {})


def phx_error(topic: str, join_ref: str | None) -> Message:
    """The channel failed; both clients rejoin after a back-off."""
    return Message(join_ref, join_ref, topic, "phx_error", {})


def presence_state(topic: str, state: dict[str, Any]) -> Message:
    """``state`` is ``{key: {"metas": [{"phx_ref": ..., ...}]}}``; the key ``ids`` is
    refused (realtime-js would read the message as a row event and throw)."""
    if _IDS in state:
        raise ValueError("a presence key 'ids' breaks realtime-js clients")
    return Message(None, None, topic, "presence_state", state)


def presence_diff(topic: str, joins: dict[str, Any], leaves: dict[str, Any]) -> Message:
    return Message(None, None, topic, "presence_diff", {"joins": joins, "leaves": leaves})


def broadcast(topic: str, event: str, payload: Any, *, meta: Any = None) -> Message:
    """A user broadcast as subscribers receive it (``meta`` e.g. ``{"id": ...}``)."""
    body: dict[str, Any] = {"type": "broadcast", "event": event, "payload": payload}
    if meta is not None:
        body["meta"] = meta
    return Message(None, None, topic, "broadcast", body)


def postgres_changes(topic: str, ids: list[int], data: dict[str, Any]) -> Message:
    return Message(None, None, topic, "postgres_changes", {"ids": ids, "data": data})


# --- join --------------------------------------------------------------------------


def _object(parent: Mapping[str, Any], key: str, where: str) -> dict[str, Any] | None:
    value = parent.get(key)
    if value is None or isinstance(value, dict):
        return value
    raise ProtocolError("InvalidJoinPayload", f"{where} must be an object, got {value!r}")


def _flag(parent: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    value = parent.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ProtocolError("InvalidJoinPayload", f"{where} must be a boolean, got {value!r}")


def _event_id(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_EVENT_ID:
        return value
    raise ProtocolError(
        "InvalidJoinPayload", f"{where} must be an event id (a non-negative integer), got {value!r}"
    )


def _resume_from(payload: Mapping[str, Any], config: Mapping[str, Any]) -> int | None:
    top = _event_id(payload.get(RESUME_FROM_KEY), RESUME_FROM_KEY)
    nested = _event_id(config.get(RESUME_FROM_KEY), f"config.{RESUME_FROM_KEY}")
    if top is not None and nested is not None and top != nested:
        raise ProtocolError(
            "InvalidJoinPayload",
            f"{RESUME_FROM_KEY} is {top} but config.{RESUME_FROM_KEY} is {nested}; send one",
        )
    return top if top is not None else nested


def _optional_text(raw: Mapping[str, Any], key: str, where: str, code: str) -> str | None:
    value = raw.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ProtocolError(code, f"{where}.{key} must be a string, got {value!r}")
    return value


def _binding(
    index: int,
    raw: Any,
    known_tables: frozenset[str],
    table_columns: Mapping[str, Mapping[str, str]] | None,
) -> tuple[str, str, str, Filter | None, dict[str, Any]]:
    where = f"config.postgres_changes[{index}]"
    if not isinstance(raw, dict):
        raise ProtocolError("InvalidJoinPayload", f"{where} must be an object, got {raw!r}")
    event_text = _optional_text(raw, "event", where, "InvalidJoinPayload") or "*"
    event = event_text.upper() if event_text.upper() in CHANGE_EVENTS else "*"
    schema = _optional_text(raw, "schema", where, "UnknownTable") or SERVED_SCHEMA
    table = _optional_text(raw, "table", where, "UnknownTable") or ALL_TABLES
    known = ", ".join(sorted(known_tables))
    if schema != SERVED_SCHEMA:
        raise ProtocolError(
            "UnknownTable", f"schema {schema!r} is not served; tables in 'public': {known}"
        )
    if table != ALL_TABLES and table not in known_tables:
        raise ProtocolError("UnknownTable", f"table {table!r} is not served; tables: {known}")
    filter_text = _optional_text(raw, "filter", where, "InvalidFilter")
    row_filter = parse_filter(filter_text) if filter_text is not None else None
    if row_filter is not None and table_columns is not None and table in table_columns:
        check_filter(row_filter, table_columns[table])
    return event, schema, table, row_filter, dict(raw)


def parse_join(
    topic: str,
    payload: dict[str, Any],
    next_id: Callable[[], int],
    known_tables: frozenset[str],
    *,
    table_columns: Mapping[str, Mapping[str, str]] | None = None,
) -> JoinConfig:
    """Read a ``phx_join`` payload. Booleans may be strings, unknown keys are ignored,
    a missing ``schema`` is ``public`` and a missing/empty/``*`` ``table`` means every
    known table. ``next_id`` is called once per binding, in request order, only when the
    whole join is valid, and must return positive ints. With ``table_columns``
    (``{table: {column: type}}``), each filter is also checked against its table.
    """
    channel_name(topic)
    if not isinstance(payload, dict):
        raise ProtocolError("InvalidJoinPayload", "the join payload must be an object")
    config = _object(payload, "config", "config") or {}
    broadcast_config = _object(config, "broadcast", "config.broadcast") or {}
    presence_config = _object(config, "presence", "config.presence")
    presence = presence_config or {}
    key = presence.get("key")
    if key is not None and not isinstance(key, str):
        raise ProtocolError("InvalidJoinPayload", f"config.presence.key must be a string: {key!r}")
    if key == _IDS:
        raise ProtocolError(
            "InvalidJoinPayload", "config.presence.key 'ids' would break realtime-js clients"
        )
    changes = config.get("postgres_changes")
    if changes is None:
        changes = []
    if not isinstance(changes, list):
        raise ProtocolError("InvalidJoinPayload", "config.postgres_changes must be an array")
    access_token = _optional_text(payload, "access_token", "payload", "InvalidJoinPayload")
    parsed = [_binding(i, raw, known_tables, table_columns) for i, raw in enumerate(changes)]
    bindings: list[ChangeBinding] = []
    for event, schema, table, row_filter, raw in parsed:
        binding_id = next_id()
        if isinstance(binding_id, bool) or not isinstance(binding_id, int) or binding_id <= 0:
            # Both clients test the id for truthiness: 0 would never be delivered.
            raise ValueError(f"next_id must return a positive int, got {binding_id!r}")
        bindings.append(ChangeBinding(binding_id, event, schema, table, row_filter, raw))
    return JoinConfig(
        broadcast_self=_flag(broadcast_config, "self", False, "config.broadcast.self"),
        broadcast_ack=_flag(broadcast_config, "ack", False, "config.broadcast.ack"),
        # As upstream: a join without a presence section has presence on.
        presence_enabled=_flag(
            presence, "enabled", presence_config is None, "config.presence.enabled"
        ),
        presence_key=key or "",
        private=_flag(config, "private", False, "config.private"),
        bindings=tuple(bindings),
        access_token=access_token,
        resume_from=_resume_from(payload, config),
    )


def join_reply_response(config: JoinConfig) -> dict[str, Any]:
    """The ``response`` of the ok join reply: every entry as the client sent it, in
    order, plus its ``id`` (the clients compare event/schema/table/filter by value)."""
    return {"postgres_changes": [{**b.raw, "id": b.id} for b in config.bindings]}


# --- columns -----------------------------------------------------------------------


def _inferred_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int8"
    if isinstance(value, float):
        return "float8"
    if isinstance(value, Decimal):
        return "numeric"
    if isinstance(value, dict | list):
        return "jsonb"
    return "text"


def columns_for(record: dict[str, Any], types: Mapping[str, str]) -> list[dict[str, str]]:
    """The ``columns`` list of ``data``: ``[{"name", "type"}]`` in record order, ``type``
    being PostgreSQL's internal name (``udt_name``: ``int4``, ``uuid``, ``timestamptz``,
    ``_text``...). realtime-js coerces *string* values by it (``bool``: 't'/'f';
    ``int2/int4/int8/float4/float8/numeric/oid``: parseFloat; ``json/jsonb``: JSON.parse;
    ``timestamp``: first space to 'T'; ``_x``: a PostgreSQL array literal parsed as x[]),
    leaves other types alone, and never changes non-string values. A column missing from
    ``types`` gets a type matching its JSON value, which realtime-js leaves unchanged."""
    return [
        {"name": name, "type": types.get(name) or _inferred_type(value)}
        for name, value in record.items()
    ]
