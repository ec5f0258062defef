"""The pages' pure modules (queue state, alert memory, backoff, presence), run in Chromium."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from conftest import LiveWorld

pytestmark = pytest.mark.slow
pytest.importorskip(
    "playwright.async_api", reason="Playwright is not installed: the browser tests are skipped"
)


@pytest.fixture
async def page(browser: Any, live: LiveWorld) -> AsyncIterator[Any]:
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(live.server.base + "/")
    try:
        yield page
    finally:
        await context.close()


QUEUE_STORE = """
async () => {
  const { QueueStore } = await import('/static/queue-state.js');
  const store = new QueueStore();
  const at = '2026-01-01T00:00:00Z';
  const row = (status, extra = {}) => ({ id: 'a', status, queued_at: at, ...extra });
  const out = [];
  out.push(store.applyEvent({ type: 'UPDATE', event_id: 5, record: row('queued') }).kind);
  // An older event arriving late never overwrites a newer state.
  out.push(store.applyEvent({ type: 'UPDATE', event_id: 4, record: row('pending_waiver') }).kind);
  out.push(store.list().length);
  out.push(store.applyEvent({ type: 'UPDATE', event_id: 6, record: row('offered') }).kind);
  // Leaving the caller's view arrives as a DELETE with the old row.
  const gone = { type: 'DELETE', event_id: 7, record: {}, old_record: row('offered') };
  out.push(store.applyEvent(gone).kind);
  out.push(store.list().length);
  out.push(store.applyEvent({ type: 'UPDATE', event_id: 8, record: row('queued') }).kind);
  out.push(store.applyEvent({ type: 'UPDATE', event_id: 9, record: row('accepted') }).kind);
  out.push(store.applyEvent({ type: 'UPDATE', event_id: 10, record: row('completed') }).kind);
  const diff = store.applySnapshot([row('queued', { id: 'b' }), row('expired', { id: 'c' })]);
  out.push(store.list().map((a) => a.id).join(','), diff.added.join(','));
  return out;
}
"""


async def test_the_queue_store_keeps_only_takeable_requests_and_never_goes_back(page: Any) -> None:
    """Events add, update and remove; an older event is ignored; any status but queued or
    offered removes; a snapshot replaces everything and keeps only what can be taken."""
    assert await page.evaluate(QUEUE_STORE) == [
        "added",
        "ignored",
        1,
        "updated",
        "removed",
        0,
        "added",
        "removed",
        "ignored",
        "b",
        "b",
    ]


ALERT_MEMORY = """
async () => {
  const { AlertMemory, alertKey } = await import('/static/queue-state.js');
  localStorage.clear();
  const first = new AlertMemory('u1');
  const out = [first.isNew, first.claim(['request:a']), first.claim(['request:a'])];
  // Another tab (a second instance on the same storage) sees the claim.
  const other = new AlertMemory('u1');
  out.push(other.isNew, other.claim(['request:a']), other.has('request:a'));
  out.push(alertKey({ id: 'a', status: 'queued' }));
  out.push(alertKey({ id: 'a', status: 'offered', offer_expires_at: 'T' }));
  first.cursor = 42;
  first.flush();
  out.push(new AlertMemory('u1').cursor);
  const stored = JSON.parse(localStorage.getItem('autodispatch.mechanic.u1'));
  stored.cursorAt = Date.now() - 2 * 3600 * 1000; // a cursor two hours old is not resumed
  localStorage.setItem('autodispatch.mechanic.u1', JSON.stringify(stored));
  out.push(new AlertMemory('u1').cursor);
  out.push(new AlertMemory('u2').has('request:a'));
  return out;
}
"""


async def test_the_alert_memory_claims_once_across_tabs_and_keeps_a_fresh_cursor(
    page: Any,
) -> None:
    """A request is claimed once per browser (every tab sees the claim); an offer has its
    own key; the cursor survives a reload but not an hour-long absence; users are apart."""
    assert await page.evaluate(ALERT_MEMORY) == [
        True,
        True,
        False,
        False,
        False,
        True,
        "request:a",
        "offer:a:T",
        42,
        None,
        False,
    ]


BACKOFF_AND_PRESENCE = """
async () => {
  const { backoffDelay, PresenceState } = await import('/static/realtime.js');
  const delays = [0, 1, 2, 3, 10, 20].map((n) => [
    backoffDelay(n, 500, 15000, () => 0), backoffDelay(n, 500, 15000, () => 0.999999)]);
  const presence = new PresenceState();
  presence.syncState({ m1: { metas: [{ phx_ref: 'r1', name: 'Mo' }] } });
  presence.syncDiff({ joins: { m2: { metas: [{ phx_ref: 'r2', name: 'Max' }] } }, leaves: {} });
  presence.syncDiff({ joins: {}, leaves: { m1: { metas: [{ phx_ref: 'r1' }] } } });
  return { delays, online: presence.list().map((p) => p.metas[0].name) };
}
"""


async def test_reconnects_back_off_with_jitter_and_presence_follows_diffs(page: Any) -> None:
    """Delays double from 0.5 s up to a 15 s cap, each jittered within its upper half;
    presence state plus diffs gives who is online now."""
    result = await page.evaluate(BACKOFF_AND_PRESENCE)
    assert result["delays"] == [
        [250, 500],
        [500, 1000],
        [1000, 2000],
        [2000, 4000],
        [7500, 15000],
        [7500, 15000],
    ]
    assert result["online"] == ["Max"]
