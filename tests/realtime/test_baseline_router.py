"""The per-subscriber SQL baseline (bench realtime) delivers exactly what the key router does."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from binding_rule import rule_violations
from prometheus_client import CollectorRegistry

from autodispatch.domain.principal import ANONYMOUS, Principal
from autodispatch.realtime.events import Event
from autodispatch.realtime.hub import Hub, RealtimeSettings
from autodispatch.realtime.metrics import RealtimeMetrics
from autodispatch.realtime.protocol import parse_filter
from autodispatch.realtime.router import Binding
from conftest import Account, World, number_committed

BINDINGS = (
    Binding(id=1, table="session_assignments", event="*"),
    Binding(id=2, table="sessions", event="*"),
    Binding(id=3, table="session_assignments", event="*", filter=parse_filter("status=eq.queued")),
    Binding(id=4, table="session_assignments", event="DELETE"),
    Binding(id=5, table="feature_flags", event="UPDATE"),
)


class Recorder:
    def __init__(self) -> None:
        self.frames: list[tuple[int, tuple[int, ...], str]] = []

    def offer(self, event: Event, ids: list[int], data_json: str) -> bool:
        self.frames.append((event.id, tuple(ids), data_json))
        return True

    async def wait_offer(
        self, event: Event, ids: list[int], data_json: str, timeout: float
    ) -> bool:
        return self.offer(event, ids, data_json)

    def close(self, reason: str) -> None:
        raise AssertionError(f"closed: {reason}")


async def _caught_up(hub: Hub, world: World) -> None:
    db = world.app.state.services.db
    await number_committed(db.url)  # the head then covers every write made so far
    async with db.as_service() as tx:
        row = await tx.one("stream_head")
    assert row is not None
    for _ in range(500):
        if hub.reader.routed >= row["last_id"]:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"reader stuck at {hub.reader.routed} < {row['last_id']}")


async def test_per_subscriber_sql_delivers_what_the_key_router_delivers(world: World) -> None:
    """Same principals and bindings (filters, event types), a whole lifecycle: same frames."""
    keys_hub: Hub = world.app.state.realtime
    sql_hub = Hub(
        world.app.state.services.db,
        RealtimeMetrics(CollectorRegistry()),
        RealtimeSettings(routing="per_subscriber_sql"),
    )
    await sql_hub.start()
    principals: dict[str, Account | None] = {
        "customer": world.customer,
        "other_customer": world.other_customer,
        "mechanic": world.mechanic,
        "other_mechanic": world.other_mechanic,
        "workshop_mechanic": world.workshop_mechanic,
        "rival_workshop_mechanic": world.rival_workshop_mechanic,
        "admin": world.admin,
        "anon": None,
    }
    by_keys: dict[str, Recorder] = {}
    by_sql: dict[str, Recorder] = {}
    try:
        for name, who in principals.items():
            principal = Principal(who.id, "authenticated") if who else ANONYMOUS
            by_keys[name], by_sql[name] = Recorder(), Recorder()
            await keys_hub.subscribe(principal, BINDINGS, by_keys[name], "test")
            await sql_hub.subscribe(principal, BINDINGS, by_sql[name], "test")

        async def post(path: str, who: Account, body: Any = None) -> None:
            r = await world.client.post(path, json=body, headers=who.headers)
            assert r.status_code == 200, r.text

        general = await world.queued()
        workshop = await world.queued(world.other_customer, workshop_id=world.workshop_id)
        await post(f"/api/assignments/{general['assignment']['id']}/accept", world.mechanic)
        await post(f"/api/sessions/{general['session']['id']}/start", world.customer)
        await post(f"/api/sessions/{general['session']['id']}/end", world.mechanic)
        await post(f"/api/sessions/{workshop['session']['id']}/cancel", world.other_customer)
        pending = await world.request()
        await post(f"/api/sessions/{pending['session']['id']}/cancel", world.customer)
        r = await world.client.patch(
            "/api/feature-flags/mech_audio_alerts",
            json={"enabled": False},
            headers=world.admin.headers,
        )
        assert r.status_code == 200, r.text

        await _caught_up(keys_hub, world)
        await _caught_up(sql_hub, world)
        for name in principals:
            assert by_sql[name].frames == by_keys[name].frames, name
            frames = [(ids, json.loads(data)) for _, ids, data in by_keys[name].frames]
            assert rule_violations(BINDINGS, frames, keys_hub.router.types) == [], name
        # The accept reaches the accepting mechanic as two frames: the UPDATE for binding 1,
        # a removal for its status=eq.queued list (3); not for its DELETE binding (4): the
        # row stays in its view.
        accept: dict[int, list[tuple[tuple[int, ...], str]]] = {}
        for event_id, ids, data in by_keys["mechanic"].frames:
            accept.setdefault(event_id, []).append((ids, json.loads(data)["type"]))
        assert [((1,), "UPDATE"), ((3,), "DELETE")] in accept.values()
        # The scenario is not trivial: removals, filtered bindings, flags, silence for anon.
        other = by_keys["other_mechanic"].frames
        assert any(4 in ids for _, ids, _ in other), "a removal (the accepted request)"
        assert any(3 in ids for _, ids, _ in other), "the status=eq.queued binding"
        rival, own = by_keys["rival_workshop_mechanic"].frames, by_keys["workshop_mechanic"].frames
        assert 0 < len(rival) < len(own), "the North workshop's request skips the South one"
        assert all(ids == (5,) for _, ids, _ in by_keys["anon"].frames)
        assert by_keys["anon"].frames, "the flag change reaches everyone"
        assert len(by_keys["admin"].frames) > len(by_keys["customer"].frames) > 0
    finally:
        await sql_hub.stop()
