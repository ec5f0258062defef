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


async def test_the_reader_survives_an_unexpected_error_and_counts_it(db_url: str) -> None:
    """An exception that is not a database error (here a transport's bug) is logged and
    counted against the realtime-reader loop, and the events after it still arrive."""
    async with started_hub(db_url) as hub:
        sink = BrokenSink()
        await hub.subscribe(ANONYMOUS, hub_bindings("feature_flags"), sink, "test")
        await flag_events(db_url, 1)
        await wait_until(lambda: hub.loops["realtime-reader"].errors >= 1)
        assert "a transport bug" in (hub.loops["realtime-reader"].last_error or "")
        later = await flag_events(db_url, 2)
        await wait_until(lambda: sink.ids[-2:] == later)
        health: Any = hub.loops["realtime-reader"]
        assert health.stale_reason() is None
