"""The Supabase Realtime wire protocol: frames, join configs, row filters, server messages.

Pure: no I/O, no clock, no randomness. The transports decode what a socket received,
the router builds what it sends; everything about the bytes on the wire lives here.

Ground truth is the stock clients' own source, read for this module:

- ``@supabase/realtime-js`` 2.109.0 (npm) with ``@supabase/phoenix`` 0.4.4:
  ``RealtimeClient``, ``RealtimeChannel``, ``lib/serializer``, ``lib/constants``,
  ``lib/transformers``, ``RealtimePostgresFilterBuilder``; phoenix ``socket``,
  ``channel``, ``push``.
- ``realtime`` 2.34.1 (PyPI): ``_async/client.py``, ``_async/channel.py``,
  ``_async/push.py``, ``message.py``, ``types.py``.

What a server must respect (each point is pinned by a test in
``tests/realtime/test_protocol.py``, most of them against the real clients):

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
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Final

VSN_1: Final = "1.0.0"
VSN_2: Final = "2.0.0"
VSNS: Final = frozenset({VSN_1, VSN_2})

TOPIC_PREFIX: Final = "realtime:"
RESUME_FROM_KEY: Final = "autodispatch_resume_from"
SERVED_SCHEMA: Final = "public"
ALL_TABLES: Final = "*"
CHANGE_EVENTS: Final = frozenset({"*", "INSERT", "UPDATE", "DELETE"})

FILTER_OPS: Final = ("eq", "neq", "lt", "lte", "gt", "gte", "in")
MAX_IN_VALUES: Final = 100
# Operators newer upstream servers take and realtime-js's filter builder can write.
_UNSUPPORTED_OPS: Final = frozenset({"like", "ilike", "is", "match", "imatch", "isdistinct", "not"})

_KIND_USER_BROADCAST_PUSH: Final = 3
_KIND_USER_BROADCAST: Final = 4
_ENCODING_BINARY: Final = 0
_ENCODING_JSON: Final = 1
_MAX_FIELD: Final = 255  # every size field of a binary frame is one byte
_BROADCAST_KEYS: Final = frozenset({"type", "event", "payload"})
_MAX_EVENT_ID: Final = 2**63 - 1  # bigint
_IDS: Final = "ids"  # realtime-js takes any payload with this key for a row event


class ProtocolError(Exception):
    """A frame, join or filter we cannot accept.

    ``code`` is stable (``MalformedFrame``, ``UnsupportedVsn``, ``BinaryFrameUnsupported``,
    ``UnsupportedBinaryKind``, ``BinaryPayloadUnsupported``, ``UnencodableMessage``,
    ``TopicNameRequired``, ``UnmatchedTopic``, ``InvalidJoinPayload``, ``UnknownTable``,
    ``InvalidFilter``); ``message`` says what to change. ``reason`` is the
    ``"Code: message"`` text of an error join reply, as upstream writes it.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def reason(self) -> str:
        return f"{self.code}: {self.message}"


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
class Filter:
    """One ``column=op.value`` condition; ``value`` is a tuple for ``in``."""

    column: str
    op: str
    value: str | tuple[str, ...]


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


def encode_json(value: Any) -> str:
    """JSON as every frame here is written: compact, ASCII only (so a lone surrogate
    cannot make a text frame invalid UTF-8) and without NaN/Infinity (``JSON.parse``
    refuses them). Use it for the ``data_json`` of ``postgres_changes_frame``."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads(text: str, what: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
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


def postgres_changes_frame(topic: str, ids: list[int], data_json: str, vsn: str) -> str:
    """The ``postgres_changes`` frame, built around ``data_json`` (one event's ``data``,
    encoded once with ``encode_json`` and shared by every recipient). Equal to
    ``encode(postgres_changes(topic, ids, data), vsn)`` when ``data_json`` is
    ``encode_json(data)``."""
    _check_vsn(vsn)
    payload = '{"ids":' + encode_json(ids) + ',"data":' + data_json + "}"
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


# --- filters -----------------------------------------------------------------------


def _filter_error(text: str, why: str) -> ProtocolError:
    return ProtocolError("InvalidFilter", f"{why} in filter {text!r}")


def _read_quoted(text: str, start: int, whole: str) -> tuple[str, int]:
    """A PostgREST-quoted value at ``text[start] == '"'``; backslash escapes any char."""
    out: list[str] = []
    i = start + 1
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        elif char == '"':
            return "".join(out), i + 1
        else:
            out.append(char)
            i += 1
    raise _filter_error(whole, "unterminated quoted value")


_AND_HINT = "combining conditions with ',' is not supported (quote a value with a comma)"


def _scalar(text: str, whole: str) -> str:
    if text.startswith('"'):
        value, end = _read_quoted(text, 0, whole)
        if end != len(text):
            raise _filter_error(whole, _AND_HINT)
        return value
    if "," in text:
        raise _filter_error(whole, _AND_HINT)
    return text


def _in_list(text: str, whole: str) -> tuple[str, ...]:
    if not text.startswith("("):
        raise _filter_error(whole, "'in' takes a list: in.(a,b,c)")
    values: list[str] = []
    i = 1
    while True:
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == '"':
            value, i = _read_quoted(text, i, whole)
            while i < len(text) and text[i] == " ":
                i += 1
        else:
            end = i
            while end < len(text) and text[end] not in ",)":
                end += 1
            value = text[i:end].strip()
            if '"' in value or "(" in value:
                raise _filter_error(whole, f"unexpected character in value {value!r}")
            i = end
        values.append(value)
        if i >= len(text):
            raise _filter_error(whole, "'in' list is not closed with ')'")
        if text[i] == ")":
            break
        i += 1  # the comma
    if i + 1 != len(text):
        raise _filter_error(whole, _AND_HINT)
    if values == [""]:
        raise _filter_error(whole, "'in' needs at least one value")
    if len(values) > MAX_IN_VALUES:
        raise _filter_error(whole, f"'in' takes at most {MAX_IN_VALUES} values")
    return tuple(values)


def parse_filter(text: str) -> Filter:
    """``column=op.value`` with op in ``FILTER_OPS``; ``in.(a,"b,c",d)`` takes up to 100
    values. Values may be PostgREST-quoted (``"a,b"``, with ``\\"`` and ``\\\\``), as
    realtime-js's filter builder writes them. Unquoted ``in`` items are stripped of spaces."""
    column, sep, rest = text.partition("=")
    if not sep or not column:
        raise _filter_error(text, "expected column=op.value")
    op, sep, value_text = rest.partition(".")
    if not sep:
        raise _filter_error(text, "expected column=op.value")
    if op in _UNSUPPORTED_OPS:
        supported = ", ".join(FILTER_OPS)
        raise _filter_error(text, f"operator {op!r} is not supported (supported: {supported})")
    if op not in FILTER_OPS:
        raise _filter_error(text, f"unknown operator {op!r}")
    if op == "in":
        return Filter(column, op, _in_list(value_text, text))
    return Filter(column, op, _scalar(value_text, text))


class _Incomparable(Exception):
    """A value that cannot be read as the column's type."""


_INTEGER = frozenset({"int2", "int4", "int8", "smallint", "integer", "bigint", "oid"})
_NUMBER = frozenset({"float4", "float8", "numeric", "decimal", "real", "double precision"})
_TEXT = frozenset({"text", "varchar", "bpchar", "char", "name", "character varying"})
_TRUE = frozenset({"t", "true", "y", "yes", "on", "1"})
_FALSE = frozenset({"f", "false", "n", "no", "off", "0"})
_KINDS: dict[str, str] = {
    **dict.fromkeys(_INTEGER, "integer"),
    **dict.fromkeys(_NUMBER, "number"),
    **dict.fromkeys(_TEXT, "text"),
    "bool": "bool",
    "boolean": "bool",
    "uuid": "uuid",
    "timestamptz": "timestamptz",
    "timestamp with time zone": "timestamptz",
    "timestamp": "timestamp",
    "timestamp without time zone": "timestamp",
    "date": "date",
    "json": "json",
    "jsonb": "json",
}
_ORDERED = frozenset(
    {"integer", "number", "text", "bool", "uuid", "timestamptz", "timestamp", "date"}
)


def _kind(column_type: str | None, value: Any) -> str:
    if column_type is not None:
        # Enums and other types compare as exact text, and are not ordered.
        return _KINDS.get(column_type, "other")
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float | Decimal):
        return "number"
    return "text"


def _decimal(value: Any) -> tuple[int, Decimal]:
    """A key ordering numbers as PostgreSQL does: NaN equals NaN and exceeds the rest."""
    if isinstance(value, bool):
        raise _Incomparable
    try:
        number = Decimal(value.strip()) if isinstance(value, str) else Decimal(str(value))
    except (InvalidOperation, ValueError, TypeError):
        raise _Incomparable from None
    if number.is_snan():
        raise _Incomparable
    return (1, Decimal(0)) if number.is_nan() else (0, number)


def _datetime(value: Any, aware: bool) -> datetime:
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise _Incomparable from None
    else:
        raise _Incomparable
    if not aware:
        return moment.replace(tzinfo=None)  # timestamp input ignores an offset
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _date(value: Any) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            raise _Incomparable from None
    raise _Incomparable


def _json_key(value: Any) -> Any:
    """Equality as jsonb has it: 1 == 1.0, but true != 1, objects ignore key order."""
    if value is None:
        return ("null",)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float | Decimal):
        return ("number", _decimal(value))
    if isinstance(value, str):
        return ("string", value)
    if isinstance(value, list | tuple):
        return ("array", tuple(_json_key(v) for v in value))
    if isinstance(value, dict):
        return ("object", tuple(sorted((str(k), _json_key(v)) for k, v in value.items())))
    raise _Incomparable


def _comparable(kind: str, value: Any, literal: bool) -> Any:
    """``value`` (a record value, or a filter literal when ``literal``) as a Python value
    that compares the way PostgreSQL compares ``kind``."""
    if kind in ("integer", "number"):
        if literal and kind == "integer":
            try:
                return (0, Decimal(int(value)))
            except ValueError:
                raise _Incomparable from None
        return _decimal(value)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise _Incomparable
    if kind == "uuid":
        if isinstance(value, uuid.UUID):
            return value
        try:
            return uuid.UUID(str(value).strip())
        except ValueError:
            raise _Incomparable from None
    if kind in ("timestamptz", "timestamp"):
        return _datetime(value, aware=kind == "timestamptz")
    if kind == "date":
        return _date(value)
    if kind == "json":
        if literal:
            try:
                value = json.loads(value, parse_constant=_reject_constant)
            except ValueError:
                raise _Incomparable from None
        return _json_key(value)
    if isinstance(value, str):
        return value
    raise _Incomparable


def _compare(op: str, left: Any, right: Any) -> bool:
    if op == "eq":
        return bool(left == right)
    if op == "neq":
        return bool(left != right)
    if op == "lt":
        return bool(left < right)
    if op == "lte":
        return bool(left <= right)
    if op == "gt":
        return bool(left > right)
    return bool(left >= right)  # gte


def matches(f: Filter, record: Mapping[str, Any], column_types: Mapping[str, str]) -> bool:
    """Whether ``record`` passes ``f``, comparing as the column's PostgreSQL type.

    SQL semantics: a null value matches nothing (not even ``neq`` or ``eq.null``; the
    literal ``null`` is just text), and neither does a missing column or a value or
    literal that does not read as the column's type. Numbers compare numerically,
    timestamps as instants (naive ``timestamptz`` values are UTC), booleans from
    ``t``/``true``/``yes``/``on``/``1``..., uuids as uuids, json by value (``eq``/``neq``/
    ``in`` only), text by code point (the C collation). Columns of other types (enums,
    arrays) compare as exact text and are not ordered. A column absent from
    ``column_types`` takes its type from the record value.
    """
    if f.column not in record:
        return False
    value = record[f.column]
    if value is None:
        return False
    kind = _kind(column_types.get(f.column), value)
    if f.op not in ("eq", "neq", "in") and kind not in _ORDERED:
        return False
    try:
        left = _comparable(kind, value, literal=False)
    except _Incomparable:
        return False
    literals = f.value if isinstance(f.value, tuple) else (f.value,)
    for literal in literals:
        try:
            right = _comparable(kind, literal, literal=True)
        except _Incomparable:
            continue
        if f.op == "in":
            if left == right:
                return True
        else:
            try:
                return _compare(f.op, left, right)
            except TypeError:  # an aware against a naive datetime, say
                return False
    return False


def check_filter(f: Filter, column_types: Mapping[str, str]) -> None:
    """Raise ``InvalidFilter`` unless ``f`` names a column of the table, its operator
    suits the column's type and every value reads as that type (what PostgreSQL would
    refuse when the subscription is created)."""
    column_type = column_types.get(f.column)
    if column_type is None:
        columns = ", ".join(column_types)
        raise ProtocolError("InvalidFilter", f"column {f.column!r} does not exist ({columns})")
    kind = _kind(column_type, None)
    if f.op not in ("eq", "neq", "in") and kind not in _ORDERED:
        raise ProtocolError(
            "InvalidFilter", f"{f.op} cannot compare column {f.column!r} of type {column_type}"
        )
    literals = f.value if isinstance(f.value, tuple) else (f.value,)
    for literal in literals:
        try:
            _comparable(kind, literal, literal=True)
        except _Incomparable:
            raise ProtocolError(
                "InvalidFilter", f"{literal!r} is not a valid {column_type} for {f.column!r}"
            ) from None


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
