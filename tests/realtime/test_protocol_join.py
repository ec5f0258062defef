"""Joins and row filters: what a stock client's join asks for, read and refused as the
hosted service does.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from protocol_helpers import (
    JS_JOIN,
    TABLES,
    TOPIC,
    code_of,
    ids_from,
    join,
)

from autodispatch.realtime.protocol import (
    RESUME_FROM_KEY,
    ChangeBinding,
    Filter,
    JoinConfig,
    ProtocolError,
    check_filter,
    columns_for,
    join_reply_response,
    matches,
    parse_filter,
    parse_join,
    presence_state,
)

# --- join --------------------------------------------------------------------------


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
