"""The event log reader is a background loop that survives any error and says so."""

from __future__ import annotations

from typing import Any

from test_resume import RecordingSink, flag_events, hub_bindings, started_hub, wait_until

from autodispatch.domain.principal import ANONYMOUS
from autodispatch.realtime.events import Event


class BrokenSink(RecordingSink):
    """A transport with a bug: its first offer raises something nobody expected."""

    def __init__(self) -> None:
        super().__init__()
        self.raised = False

    def offer(self, event: Event, ids: tuple[int, ...], data_json: str) -> bool:
        if not self.raised:
            self.raised = True
            raise RuntimeError("a transport bug")
        return super().offer(event, ids, data_json)


async def test_a_sink_that_raises_is_closed_alone_and_the_others_miss_nothing(
    db_url: str,
) -> None:
    """A transport's bug (its offer raises) closes that subscriber alone, with
    ``internal_error`` (it resumes from its cursor, which did not move past the event);
    every other subscriber gets that event and the next ones, and the reader goes on."""
    async with started_hub(db_url) as hub:
        broken = BrokenSink()
        healthy = [RecordingSink() for _ in range(20)]
        for sink in [broken, *healthy]:
            await hub.subscribe(ANONYMOUS, hub_bindings("feature_flags"), sink, "test")
        first = await flag_events(db_url, 1)
        later = await flag_events(db_url, 2)
        await wait_until(lambda: all(s.ids == first + later for s in healthy))
        assert broken.closed_reason == "internal_error"
        assert hub.loops["realtime-reader"].errors == 0


async def test_the_reader_survives_an_unexpected_error_and_counts_it(db_url: str) -> None:
    """An exception of the reader's own (here from its routing hook) is logged and counted
    against the realtime-reader loop, and the events after it still arrive."""
    async with started_hub(db_url) as hub:
        sink = RecordingSink()
        await hub.subscribe(ANONYMOUS, hub_bindings("feature_flags"), sink, "test")
        failed: list[int] = []

        async def route_once_broken(event: Event) -> dict[str, int]:
            if not failed:
                failed.append(event.id)
                raise RuntimeError("a routing bug")
            return dict(hub.router.route_collecting(event)[0])

        hub.reader.route_async = route_once_broken
        await flag_events(db_url, 1)
        await wait_until(lambda: hub.loops["realtime-reader"].errors >= 1)
        assert "a routing bug" in (hub.loops["realtime-reader"].last_error or "")
        later = await flag_events(db_url, 2)
        await wait_until(lambda: sink.ids[-2:] == later)
        health: Any = hub.loops["realtime-reader"]
        assert health.stale_reason() is None
