"""What the protocol tests share: the join helpers, the stock clients' versions, and the
hypothesis strategies for frames."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import strategies as st

from autodispatch.realtime.protocol import (
    JoinConfig,
    Message,
    ProtocolError,
    columns_for,
    parse_join,
)

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
