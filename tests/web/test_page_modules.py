"""The pages' pure modules (queue state, catch-ups, alert memory, receipt outbox, backoff,
presence), run in Chromium."""

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


RECEIPT_OUTBOX = """
async () => {
  const { ReceiptOutbox } = await import('/static/receipts.js');
  localStorage.clear();
  const key = 'autodispatch.receipts.u1';
  const stored = () => JSON.parse(localStorage.getItem(key) || '[]')
    .map((e) => e.receipt.assignment_id);
  const posted = [];
  let answerOld;
  const oldAnswered = new Promise((resolve) => { answerOld = resolve; });
  window.fetch = async (path, init) => {
    const { assignment_id: id } = JSON.parse(init.body);
    posted.push(id);
    if (id === 'old') {
      await oldAnswered;
      return new Response('{}', { status: 201 });
    }
    throw new TypeError('Failed to fetch'); // offline: kept for later
  };
  localStorage.setItem(key, JSON.stringify([
    { at: Date.now() - 2 * 86400 * 1000, receipt: { assignment_id: 'stale' } },
    { at: Date.now(), receipt: { assignment_id: 'old' } },
  ]));
  const outbox = new ReceiptOutbox('u1', { accessToken: 'token' });
  const retrying = outbox.retry(); // now posting 'old'
  await outbox.send({ assignment_id: 'new' }); // fails while the retry waits: kept
  const during = stored();
  answerOld();
  await retrying;
  return { posted, during, after: stored() };
}
"""


async def test_a_receipt_kept_while_the_outbox_retries_is_not_wiped_by_the_retry(
    page: Any,
) -> None:
    """A receipt that fails (and is kept) while a retry is sending the older ones is still
    kept when the retry ends; the retry removes only what it sent or found too old."""
    assert await page.evaluate(RECEIPT_OUTBOX) == {
        "posted": ["old", "new"],
        "during": ["stale", "old", "new"],
        "after": ["new"],
    }


OVERLAPPING_CATCH_UPS = """
async () => {
  const { QueueStore, CatchUp } = await import('/static/queue-state.js');
  const store = new QueueStore();
  const catchUps = new CatchUp();
  const row = (id, status) => ({ id, status, queued_at: `2026-01-01T00:00:0${id.length}Z` });
  const event = (id, status, eventId) => (
    { type: 'UPDATE', event_id: eventId, record: row(id, status) });
  // What the page does with an event: keep it while a read loads, apply it at once.
  const deliver = (data) => { catchUps.note(data); store.applyEvent(data); };
  const loaded = (load, snapshot) => {
    const events = catchUps.finish(load);
    if (events === null) return 'dropped';
    store.applySnapshot(snapshot);
    for (const data of events) store.applyEvent(data);
    return 'applied';
  };
  const ids = () => store.list().map((a) => a.id).join(',');
  const out = [];
  const first = catchUps.begin(); // subscribed: the queue read starts
  const second = catchUps.begin(); // subscribed again (a rejoin) while it loads
  deliver(event('a', 'accepted', 11)); // taken after both reads saw it queued
  deliver(event('b', 'queued', 12)); // new after both reads
  out.push(catchUps.active, ids());
  // The first read ends last but one: its snapshot is dropped, events are still kept.
  out.push(loaded(first, [row('a', 'queued')]), catchUps.active, ids());
  deliver(event('c', 'queued', 13));
  out.push(loaded(second, [row('a', 'queued')]), catchUps.active, ids());
  out.push(catchUps.note(event('d', 'queued', 14)), catchUps.isCurrent(second));
  // A read that failed ends the catch-up too; a stale failure changes nothing.
  const third = catchUps.begin();
  const fourth = catchUps.begin();
  out.push(catchUps.finish(third), catchUps.active, catchUps.finish(fourth).length);
  return out;
}
"""


async def test_of_overlapping_catch_ups_only_the_latest_snapshot_applies(page: Any) -> None:
    """A second subscribe while the first queue read loads: the first read's snapshot is
    dropped (a taken request does not come back, a new one does not vanish), and events
    are kept until the latest read applies, then re-applied on top of it."""
    assert await page.evaluate(OVERLAPPING_CATCH_UPS) == [
        True,
        "b",
        "dropped",
        True,
        "b",
        "applied",
        False,
        "b,c",
        False,
        True,
        None,
        True,
        0,
    ]


OWN_PRESENCE_KEY = """
async () => {
  const { RealtimeSocket } = await import('/static/realtime.js');
  const socket = new RealtimeSocket({ url: 'ws://localhost:9/nowhere', token: () => null });
  const channel = socket.channel('mechanics-online',
    { presence: { key: 'wished', meta: { name: 'Mo' } } });
  const pushed = [];
  socket.push = async (topic, event, payload) => { pushed.push(payload.payload); return null; };
  channel.state = 'joined';
  await channel.track({ name: 'Mo' });
  const mine = pushed[0];
  const other = { phx_ref: 'r1', name: 'Max', client_ref: 'someone-else' };
  const out = [channel.presenceKey];
  // The server listed this page under a key of its choosing, not the one it wished for.
  channel.receive({ event: 'presence_state', payload: {
    'server-key-max': { metas: [other] },
    'server-key-mo': { metas: [{ ...mine, phx_ref: 'r2' }] } } });
  out.push(channel.presenceKey);
  channel.receive({ event: 'presence_diff', payload: {
    joins: {}, leaves: { 'server-key-mo': { metas: [{ phx_ref: 'r2' }] } } } });
  out.push(channel.presenceKey);
  channel.receive({ event: 'presence_diff', payload: {
    joins: { 'wished': { metas: [{ ...mine, phx_ref: 'r3' }] } }, leaves: {} } });
  out.push(channel.presenceKey, typeof mine.client_ref, mine.name);
  return out;
}
"""


async def test_a_page_learns_the_presence_key_the_server_chose_from_its_payloads(
    page: Any,
) -> None:
    """A tracked presence carries a random client_ref; the page finds it in presence_state
    and presence_diff and so knows its key, whatever key it asked for."""
    assert await page.evaluate(OWN_PRESENCE_KEY) == [
        None,
        "server-key-mo",
        None,
        "wished",
        "string",
        "Mo",
    ]
