"""Row filters of ``postgres_changes`` bindings: ``column=op.value``, parsed and evaluated.

Ops: ``eq, neq, lt, lte, gt, gte, in`` (``in.(a,b,c)``, at most 100 values), compared
with the column's PostgreSQL type (numbers numerically, timestamps as instants,
booleans from 't'/'f'...). A null value or a missing column never matches, as in SQL.
Part of the wire protocol (``protocol.py`` re-exports it); pure.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from autodispatch.realtime.errors import ProtocolError

FILTER_OPS: Final = ("eq", "neq", "lt", "lte", "gt", "gte", "in")
MAX_IN_VALUES: Final = 100
# Operators newer upstream servers take and realtime-js's filter builder can write.
_UNSUPPORTED_OPS: Final = frozenset({"like", "ilike", "is", "match", "imatch", "isdistinct", "not"})


def reject_json_constant(name: str) -> Any:
    """``json.loads(parse_constant=...)``: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not JSON")


@dataclass(frozen=True, slots=True)
class Filter:
    """One ``column=op.value`` condition; ``value`` is a tuple for ``in``."""

    column: str
    op: str
    value: str | tuple[str, ...]


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
                value = json.loads(value, parse_constant=reject_json_constant)
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
