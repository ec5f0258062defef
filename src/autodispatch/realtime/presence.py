"""Presence held between processes, without I/O: the shape of the entries, the diff
arithmetic, a snapshot's chunks and their assembly, and the gate that orders a snapshot
against diffs. shared_presence.py puts them to work over the bus.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from autodispatch.realtime.bus import encode

Refs = dict[str, dict[str, Any]]  # phx_ref -> meta (which holds its phx_ref)
Keys = dict[str, Refs]  # presence key -> refs
Topics = dict[str, Keys]  # topic -> keys


@dataclass
class Assembly:
    """The chunks of one origin's snapshot received so far."""

    snapshot: int
    next_seq: int = 0
    topics: Topics = field(default_factory=dict)


class Gate:
    """Presence diffs pass together (each touches its own ref, so their order does not
    matter); a snapshot or bye passes alone, once the diffs passing have gone out and
    before any that come after it."""

    def __init__(self) -> None:
        self._alone = asyncio.Lock()  # first come, first served: diffs wait behind it
        self._passing = 0
        self._clear = asyncio.Event()
        self._clear.set()

    @asynccontextmanager
    async def diff(self) -> AsyncIterator[None]:
        async with self._alone:
            self._passing += 1
            self._clear.clear()
        try:
            yield
        finally:
            self._passing -= 1
            if not self._passing:
                self._clear.set()

    @asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        async with self._alone:
            await self._clear.wait()
            yield


def merge(keys: Keys, joins: Keys, leaves: Keys) -> tuple[Keys, Keys]:
    """Apply a diff to ``keys``; return what it changed (joins of new or changed refs,
    leaves of refs that were there), which is what members should be told."""
    joined: Keys = {}
    left: Keys = {}
    for key, refs in joins.items():
        held = keys.setdefault(key, {})
        for ref, meta in refs.items():
            if held.get(ref) != meta:
                held[ref] = joined.setdefault(key, {})[ref] = meta
        if not held:
            del keys[key]
    for key, refs in leaves.items():
        held = keys.get(key, {})
        for ref in refs:
            if ref in held:
                left.setdefault(key, {})[ref] = held.pop(ref)
        if key in keys and not held:
            del keys[key]
    return joined, left


def difference(old: Keys, new: Keys) -> tuple[Keys, Keys]:
    """The diff that turns ``old`` into ``new``. A ref whose meta changed is only a join:
    clients apply joins before leaves, by ref, so a leave would remove it again."""
    joins: Keys = {}
    leaves: Keys = {}
    for key, refs in new.items():
        before = old.get(key, {})
        changed = {ref: meta for ref, meta in refs.items() if before.get(ref) != meta}
        if changed:
            joins[key] = changed
    for key, refs in old.items():
        after = new.get(key, {})
        gone = {ref: meta for ref, meta in refs.items() if ref not in after}
        if gone:
            leaves[key] = gone
    return joins, leaves


def chunks(entries: list[list[Any]], room: int) -> list[list[list[Any]]]:
    """Entries packed in order into lists whose JSON takes at most ``room`` characters
    (an entry larger than that goes alone). Always one list at least: an empty snapshot
    still says "I own nothing"."""
    packed: list[list[list[Any]]] = [[]]
    used = 0
    for entry in entries:
        size = len(encode(entry)) + 1  # and its comma
        if packed[-1] and used + size > room:
            packed.append([])
            used = 0
        packed[-1].append(entry)
        used += size
    return packed


def as_metas(keys: Keys) -> dict[str, Any]:
    """``keys`` as clients see them in a presence_diff: ``{key: {"metas": [meta, ...]}}``."""
    return {key: {"metas": list(refs.values())} for key, refs in keys.items()}


def checked_keys(value: Any) -> Keys:
    """A diff's joins or leaves from the bus, checked: {key: {ref: {meta}}}."""
    if not isinstance(value, dict) or not all(
        isinstance(refs, dict) and all(isinstance(meta, dict) for meta in refs.values())
        for refs in value.values()
    ):
        raise ValueError("presence keys must be {key: {ref: {meta}}}")
    return value
