"""What realtime-js makes of ``postgres_changes`` frames, and what each binding should get.

realtime-js (``RealtimeChannel._trigger``) calls a binding for a frame when the binding's
id is in ``ids`` and its event is ``*`` or the frame's ``data.type``; it checks no filter.
So every frame must list only bindings that want its type and whose filter holds for the
row it carries, and each binding must get what it would get were it alone on the channel.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from autodispatch.realtime.events import Event
from autodispatch.realtime.protocol import encode_json, matches
from autodispatch.realtime.router import Binding

Frame = tuple[Sequence[int], Mapping[str, Any]]  # (ids, data) of one postgres_changes frame


def calls(binding: Binding, ids: Sequence[int], data: Mapping[str, Any]) -> bool:
    """Whether realtime-js calls ``binding`` for this frame."""
    wanted = binding.event == "*" or binding.event.lower() == str(data["type"]).lower()
    return bool(binding.id) and binding.id in ids and wanted


def rule_violations(
    bindings: Iterable[Binding], frames: Iterable[Frame], types: Mapping[str, Mapping[str, str]]
) -> list[str]:
    """Frames listing a binding that does not want their type, or whose filter fails on
    the row they carry (``record``, or ``old_record`` for a DELETE)."""
    by_id = {b.id: b for b in bindings}
    found: list[str] = []
    for ids, data in frames:
        row = data["old_record"] if data["type"] == "DELETE" else data["record"]
        for i in ids:
            b = by_id[i]
            if not b.wants(data["type"]):
                found.append(f"binding {i} ({b.event}) listed on a {data['type']} frame")
            elif b.filter is not None and not matches(b.filter, row, types.get(b.table, {})):
                found.append(f"binding {i} ({b.filter}) listed on a frame whose row fails it")
    return found


def received(bindings: Iterable[Binding], frames: Iterable[Frame]) -> dict[int, list[Any]]:
    """The ``data`` objects realtime-js hands each binding, in order (without our
    ``partial`` mark, which says where a cursor may move, not what the row is)."""
    frames = list(frames)
    return {
        b.id: [
            {k: v for k, v in data.items() if k != "partial"}
            for ids, data in frames
            if calls(b, ids, data)
        ]
        for b in bindings
    }


def alone(
    keys: frozenset[str],
    bindings: Iterable[Binding],
    events: Iterable[Event],
    types: Mapping[str, Mapping[str, str]],
    columns: Mapping[str, list[dict[str, str]]],
) -> dict[int, list[Any]]:
    """What each binding gets when it is alone on its channel (``Event.variant_for``)."""
    events = list(events)
    out: dict[int, list[Any]] = {}
    for b in bindings:
        got: list[Any] = []
        for event in events:
            if event.table != b.table:
                continue
            variant = event.variant_for(keys, b.filter, types.get(b.table, {}))
            if variant is not None and b.wants(event.delivered_type(variant)):
                data = event.data(variant, columns.get(event.table, []))
                got.append(json.loads(encode_json(data)))
        out[b.id] = got
    return out
