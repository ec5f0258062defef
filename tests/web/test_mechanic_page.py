"""The mechanic dashboard in a real browser: alerts, tiers, flags, reconnects, accepts."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from typing import Any

import httpx
import pytest
from web_browser import SLOW, Pages, receipts, set_flag, wait_for

from conftest import Account, LiveServer, LiveWorld

pytestmark = pytest.mark.slow
pytest.importorskip(
    "playwright.async_api", reason="Playwright is not installed: the browser tests are skipped"
)
from playwright.async_api import expect  # noqa: E402

PHONE = {"width": 390, "height": 844}
DENY_NOTIFICATIONS_AND_BREAK_AUDIO = """
Object.defineProperty(Notification, 'permission', { get: () => 'denied' });
Notification.requestPermission = async () => 'denied';
window.AudioContext = function () { throw new Error('audio device exploded'); };
window.webkitAudioContext = undefined;
"""


async def queued(live: LiveWorld, customer: Account) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        return await live.queued(client, customer)


async def fill_request(page: Any) -> None:
    await page.get_by_label("Year").fill("2016")
    await page.get_by_label("Make").fill("Toyota")
    await page.get_by_label("Model").fill("Corolla")
    await page.get_by_label("What is wrong?").fill("Grinding noise when braking")
    await page.get_by_role("button", name="Request a mechanic").click()


def card(page: Any, assignment_id: str) -> Any:
    return page.locator(f'.request-card[data-assignment-id="{assignment_id}"]')


def toast(page: Any, assignment_id: str) -> Any:
    return page.locator(f'.toast[data-assignment-id="{assignment_id}"]')


async def fence(live: LiveWorld, admin: Account, page: Any) -> None:
    """Flip a flag back and forth and wait until the page has seen both changes: events
    reach a page in log order, so whatever it has not received by then was never sent."""
    item = page.locator('#flag-list li[data-flag="mech_new_request_alerts"]')
    await set_flag(live, admin, "mech_new_request_alerts", False)
    await expect(item).to_have_attribute("data-enabled", "false", timeout=SLOW)
    await set_flag(live, admin, "mech_new_request_alerts", True)
    await expect(item).to_have_attribute("data-enabled", "true", timeout=SLOW)


async def test_a_waiver_alerts_both_mechanics_within_two_seconds_and_an_accept_takes_it_away(
    pages: Pages, live: LiveWorld
) -> None:
    """A signed waiver puts the request and its toast on two mechanics' pages within 2 s,
    badges the title, records a receipt; when one accepts, it leaves the other page."""
    mo = await live.make("mo", "mechanic")
    max_ = await live.make("max", "mechanic")
    cara = await live.make("cara", "customer")
    first = await pages.signed_in("mechanic-mo", "/mechanic", mo)
    second = await pages.signed_in("mechanic-max", "/mechanic", max_)
    customer = await pages.signed_in("customer", "/customer", cara, viewport=PHONE)

    await fill_request(customer)
    await expect(customer.locator("#session-status")).to_have_text(
        "Sign the waiver to send your request.", timeout=SLOW
    )
    await customer.get_by_label("I have read and agree to the waiver").check()
    started = time.monotonic()
    await customer.get_by_role("button", name="Sign the waiver").click()
    await asyncio.gather(
        expect(first.locator(".toast")).to_be_visible(timeout=2000),
        expect(second.locator(".toast")).to_be_visible(timeout=2000),
    )
    assert time.monotonic() - started < 2.0
    await expect(customer.locator("#session-status")).to_have_text("Waiting for a mechanic…")
    await expect(customer.locator("#banner")).to_be_visible()

    for page in (first, second):
        await expect(page.locator(".request-card")).to_have_count(1)
        await expect(page.locator(".request-card h3")).to_have_text("Cara · 2016 Toyota Corolla")
        await expect(page).to_have_title(re.compile(r"^\(1\) New request"))
        await expect(page.locator('link[rel="icon"]')).to_have_attribute("data-badged", "true")
        await expect(page.locator("#announcer")).to_contain_text("New request: Cara")
    await pages.screenshot("mechanic-mo", "alerted", docs="mechanic.png")
    await pages.screenshot("customer", "waiting", docs="customer-waiting.png")

    assignment_id = await first.locator(".request-card").get_attribute("data-assignment-id")
    for mechanic in (mo, max_):
        (receipt,) = await wait_for(lambda m=mechanic: receipts(live.db_url, m), what="a receipt")
        assert receipt["assignment_id"] == assignment_id
        assert receipt["event_id"] is not None
        assert receipt["tiers"]["toast"] == {"status": "shown"}
        assert receipt["tiers"]["title"] == {"status": "shown"}
        assert receipt["tiers"]["favicon"] == {"status": "shown"}
        assert set(receipt["tiers"]) == {"toast", "sound", "notification", "title", "favicon"}
        assert 0 <= receipt["commit_to_shown_ms"] < 2000

    await first.locator(".request-card").get_by_role("button", name="Accept").click()
    await expect(second.locator(".request-card")).to_have_count(0, timeout=SLOW)
    await expect(second.locator(".toast")).to_have_count(0)
    await expect(second.locator("#queue-empty")).to_be_visible()
    await expect(first.locator("#active-session")).to_be_visible(timeout=SLOW)
    await expect(first.locator("#banner")).to_contain_text("Accepted session with Cara")
    await expect(customer.locator("#session-status")).to_have_text("Mo accepted", timeout=SLOW)


async def test_a_late_accept_is_told_another_mechanic_took_it(
    pages: Pages, live: LiveWorld
) -> None:
    """A mechanic who clicks Accept after someone else won (the removal not yet on the
    page) sees "Another mechanic took this request", and the card goes."""
    mo = await live.make("mo", "mechanic")
    max_ = await live.make("max", "mechanic")
    cara = await live.make("cara", "customer")
    holding = False

    async def relay(ws: Any) -> None:
        # Forward the realtime socket, holding back row events while `holding` is set.
        server = ws.connect_to_server()
        server.on_message(
            lambda message: (
                None if holding and "postgres_changes" in str(message) else ws.send(message)
            )
        )

    context = await pages.context()
    await context.route_web_socket(re.compile(r"/realtime/v1/websocket"), relay)
    page = await pages.signed_in("mechanic-mo", "/mechanic", mo, context=context)
    pair = await queued(live, cara)
    assignment_id = pair["assignment"]["id"]
    await expect(card(page, assignment_id)).to_be_visible(timeout=SLOW)

    holding = True
    async with httpx.AsyncClient() as client:
        r = await client.post(
            f"{live.server.base}/api/assignments/{assignment_id}/accept", headers=max_.headers
        )
        assert r.status_code == 200, r.text
    await card(page, assignment_id).get_by_role("button", name="Accept").click()
    await expect(page.locator("#queue-message")).to_have_text(
        "Another mechanic took this request.", timeout=SLOW
    )
    await expect(card(page, assignment_id)).to_have_count(0)
    await expect(page.locator("#active-session")).to_be_hidden()


async def test_a_tier_that_throws_neither_stops_the_toast_nor_the_next_alert(
    pages: Pages, live: LiveWorld
) -> None:
    """With notifications denied and audio throwing, each alert still shows its toast,
    badges the title, and reports the two failures with their reasons."""
    mo = await live.make("mo", "mechanic")
    cara = await live.make("cara", "customer")
    page = await pages.signed_in(
        "mechanic", "/mechanic", mo, init_script=DENY_NOTIFICATIONS_AND_BREAK_AUDIO
    )
    first = await queued(live, cara)
    await expect(toast(page, first["assignment"]["id"])).to_be_visible(timeout=SLOW)
    second = await queued(live, cara)
    await expect(toast(page, second["assignment"]["id"])).to_be_visible(timeout=SLOW)
    await expect(page).to_have_title(re.compile(r"^\(2\) New request"))
    await pages.screenshot("mechanic", "two-alerts")

    found = await wait_for(
        lambda: len(receipts(live.db_url, mo)) == 2 and receipts(live.db_url, mo)
    )
    for receipt in found:
        tiers = receipt["tiers"]
        assert tiers["toast"]["status"] == "shown"
        assert tiers["title"]["status"] == "shown"
        assert tiers["notification"]["status"] == "failed"
        assert "denied" in tiers["notification"]["error"]
        assert tiers["sound"]["status"] == "failed"
        assert "audio device exploded" in tiers["sound"]["error"]


async def test_a_flag_that_is_off_keeps_its_tier_silent(pages: Pages, live: LiveWorld) -> None:
    """Sound and visual indicators off: the toast shows, the title and icon stay as they
    were, the receipt says disabled. All alerts off: the card comes, no toast."""
    mo = await live.make("mo", "mechanic")
    ada = await live.make("ada", "admin")
    cara = await live.make("cara", "customer")
    page = await pages.signed_in("mechanic", "/mechanic", mo)
    await set_flag(live, ada, "mech_visual_indicators", False)
    await set_flag(live, ada, "mech_audio_alerts", False)
    for flag in ("mech_visual_indicators", "mech_audio_alerts"):
        await expect(page.locator(f'#flag-list li[data-flag="{flag}"]')).to_have_attribute(
            "data-enabled", "false", timeout=SLOW
        )
    title = await page.title()

    first = await queued(live, cara)
    await expect(toast(page, first["assignment"]["id"])).to_be_visible(timeout=SLOW)
    (receipt,) = await wait_for(lambda: receipts(live.db_url, mo), what="a receipt")
    assert receipt["tiers"]["toast"]["status"] == "shown"
    for tier in ("title", "favicon", "sound"):
        assert receipt["tiers"][tier]["status"] == "disabled", receipt
    assert await page.title() == title
    assert await page.locator('link[rel="icon"]').get_attribute("data-badged") is None

    await set_flag(live, ada, "mech_new_request_alerts", False)
    await expect(
        page.locator('#flag-list li[data-flag="mech_new_request_alerts"]')
    ).to_have_attribute("data-enabled", "false", timeout=SLOW)
    second = await queued(live, cara)
    await expect(card(page, second["assignment"]["id"])).to_be_visible(timeout=SLOW)
    # The receipt is written after every tier has run: by then a toast would be there.
    found = await wait_for(
        lambda: len(receipts(live.db_url, mo)) == 2 and receipts(live.db_url, mo)
    )
    assert all(t["status"] == "disabled" for t in found[1]["tiers"].values()), found[1]
    await expect(toast(page, second["assignment"]["id"])).to_have_count(0)
    assert await page.title() == title


async def test_a_request_made_while_the_network_is_cut_appears_after_reconnect_alerted_once(
    pages: Pages, live: LiveWorld
) -> None:
    """Offline, the page says realtime is down and polls; back online it resumes from its
    cursor, shows the request made meanwhile and alerts for it exactly once, whichever
    came first: a poll, the catch-up read or the replayed event."""
    mo = await live.make("mo", "mechanic")
    ada = await live.make("ada", "admin")
    cara = await live.make("cara", "customer")
    page = await pages.signed_in("mechanic", "/mechanic?poll_after_ms=2000&poll_every_ms=1000", mo)
    await fence(live, ada, page)  # the page has a cursor now

    await page.context.set_offline(True)
    await expect(page.locator("#connection")).not_to_have_text("Live", timeout=SLOW)
    pair = await queued(live, cara)
    assignment_id = pair["assignment"]["id"]
    await expect(page.locator("#poll-notice")).to_contain_text("Realtime is down", timeout=SLOW)
    await pages.screenshot("mechanic", "offline")
    await expect(card(page, assignment_id)).to_have_count(0)

    await page.context.set_offline(False)
    await expect(card(page, assignment_id)).to_be_visible(timeout=SLOW)
    await expect(toast(page, assignment_id)).to_have_count(1)
    await expect(page.locator("#connection")).to_have_text("Live", timeout=SLOW)
    await expect(page.locator("#poll-notice")).to_be_hidden()
    await fence(live, ada, page)
    await expect(toast(page, assignment_id)).to_have_count(1)
    await expect(page).to_have_title(re.compile(r"^\(1\) New request"))
    found = await wait_for(lambda: receipts(live.db_url, mo), what="a receipt")
    assert [r["assignment_id"] for r in found] == [assignment_id]
    # Named by an event either way (a read that won sends the assignment: the server
    # finds its event).
    assert found[0]["event_id"] is not None


async def test_a_request_a_read_shows_before_its_event_alerts_once_and_the_event_names_it(
    pages: Pages, live: LiveWorld
) -> None:
    """Back online with the row events held back: a read (a poll or the catch-up) shows
    the request and alerts; the replayed event, let through afterwards, alerts nothing
    more, and the one receipt names one of the request's events."""
    mo = await live.make("mo", "mechanic")
    ada = await live.make("ada", "admin")
    cara = await live.make("cara", "customer")
    holding = False
    held: list[tuple[Any, Any]] = []

    def relay(ws: Any) -> None:
        # Forward the realtime socket, keeping row events back while `holding` is set.
        server = ws.connect_to_server()

        def forward(message: Any) -> None:
            if holding and json.loads(message).get("event") == "postgres_changes":
                held.append((ws, message))
            else:
                ws.send(message)

        server.on_message(forward)

    context = await pages.context()
    await context.route_web_socket(re.compile(r"/realtime/v1/websocket"), relay)
    page = await pages.signed_in(
        "mechanic", "/mechanic?poll_after_ms=2000&poll_every_ms=1000", mo, context=context
    )
    await fence(live, ada, page)  # the page has a cursor now

    await page.context.set_offline(True)
    await expect(page.locator("#poll-notice")).to_contain_text("Realtime is down", timeout=SLOW)
    pair = await queued(live, cara)
    assignment_id = pair["assignment"]["id"]
    holding = True
    await page.context.set_offline(False)
    await expect(card(page, assignment_id)).to_be_visible(timeout=SLOW)
    await expect(toast(page, assignment_id)).to_have_count(1)
    await expect(page.locator("#connection")).to_have_text("Live", timeout=SLOW)
    await wait_for(
        lambda: any(assignment_id in str(m) for _, m in held), what="the replay, held back"
    )

    holding = False
    for ws, message in held:
        ws.send(message)
    await fence(live, ada, page)
    await expect(toast(page, assignment_id)).to_have_count(1)
    found = await wait_for(lambda: receipts(live.db_url, mo), what="a receipt")
    assert [r["assignment_id"] for r in found] == [assignment_id]
    replayed = [json.loads(m)["payload"]["data"] for _, m in held]
    assert found[0]["event_id"] in [
        d["event_id"] for d in replayed if (d.get("record") or {}).get("id") == assignment_id
    ]
    assert len(receipts(live.db_url, mo)) == 1


def fake_request(name: str) -> dict[str, Any]:
    """A queue item no database has: it shows which snapshot the page applied."""
    at = "2026-01-01T00:00:00Z"
    return {
        "id": str(uuid.uuid4()),
        "session_id": str(uuid.uuid4()),
        "status": "queued",
        "request_summary": {
            "customer_first_name": name,
            "vehicle": "2001 Test Car",
            "concern": "only in one snapshot",
            "session_type": "free",
            "created_at": at,
        },
        "queued_at": at,
        "created_at": at,
    }


async def test_of_two_catch_ups_in_a_row_the_older_snapshot_never_wins(
    pages: Pages, live: LiveWorld
) -> None:
    """The queue channel rejoins twice and its first queue read answers last: that older
    snapshot is dropped, so a request that came in meanwhile stays, and what only the
    older snapshot had never shows; the newer snapshot applies."""
    mo = await live.make("mo", "mechanic")
    ada = await live.make("ada", "admin")
    cara = await live.make("cara", "customer")
    sockets: list[Any] = []

    def relay(ws: Any) -> None:
        sockets.append(ws)
        server = ws.connect_to_server()
        server.on_message(lambda message: ws.send(message))

    context = await pages.context()
    await context.route_web_socket(re.compile(r"/realtime/v1/websocket"), relay)
    page = await pages.signed_in("mechanic", "/mechanic", mo, context=context)
    await fence(live, ada, page)

    older, newer = fake_request("Older"), fake_request("Newer")
    first_read, answer_first = asyncio.Event(), asyncio.Event()
    reads = 0

    async def queue_reads(route: Any) -> None:
        nonlocal reads
        reads += 1
        read = reads
        response = await route.fetch()  # the server's answer now
        body = await response.json()
        if read == 1:
            body["items"].append(older)
            first_read.set()
            await answer_first.wait()
        elif read == 2:
            body["items"].append(newer)
        await route.fulfill(response=response, json=body)

    def rejoin() -> None:
        # As when the server closes the channel: the page rejoins, then reads the queue.
        frame = {"topic": f"realtime:queue:{mo.id}", "event": "phx_error", "payload": {}}
        sockets[-1].send(json.dumps({**frame, "ref": None, "join_ref": None}))

    await page.route(re.compile(r"/api/mechanic/queue$"), queue_reads)
    rejoin()
    await asyncio.wait_for(first_read.wait(), SLOW / 1000)
    pair = await queued(live, cara)  # after the first read, before the second
    assignment_id = pair["assignment"]["id"]
    await expect(card(page, assignment_id)).to_be_visible(timeout=SLOW)
    rejoin()
    await expect(card(page, newer["id"])).to_be_visible(timeout=SLOW)

    answer_first.set()
    await fence(live, ada, page)  # the first answer has been handled by now
    assert reads == 2
    await expect(card(page, older["id"])).to_have_count(0)
    await expect(card(page, assignment_id)).to_be_visible()
    await expect(card(page, newer["id"])).to_be_visible()


async def test_a_socket_that_goes_silent_is_noticed_by_heartbeat_and_resumed(
    pages: Pages, live: LiveWorld
) -> None:
    """A connection that stops answering without closing (a half-open socket: no offline
    event, no close) is caught by the unanswered heartbeat; the page reconnects, resumes
    from its cursor and alerts once for the request made meanwhile."""
    mo = await live.make("mo", "mechanic")
    ada = await live.make("ada", "admin")
    cara = await live.make("cara", "customer")
    sockets: list[Any] = []
    silenced: set[int] = set()

    def relay(ws: Any) -> None:
        index = len(sockets)
        sockets.append(ws)
        server = ws.connect_to_server()
        server.on_message(lambda message: None if index in silenced else ws.send(message))

    context = await pages.context()
    await context.route_web_socket(re.compile(r"/realtime/v1/websocket"), relay)
    page = await pages.signed_in("mechanic", "/mechanic?heartbeat_ms=1000", mo, context=context)
    await fence(live, ada, page)
    silenced.add(len(sockets) - 1)
    pair = await queued(live, cara)
    assignment_id = pair["assignment"]["id"]
    await expect(card(page, assignment_id)).to_be_visible(timeout=SLOW)
    assert len(sockets) >= 2, "the page should have opened a new socket"
    await expect(toast(page, assignment_id)).to_have_count(1)
    await fence(live, ada, page)
    await expect(toast(page, assignment_id)).to_have_count(1)
    (receipt,) = await wait_for(lambda: receipts(live.db_url, mo), what="a receipt")
    assert receipt["assignment_id"] == assignment_id and receipt["event_id"] is not None


async def test_a_request_that_came_while_the_page_was_closed_alerts_once_on_return(
    pages: Pages, live: LiveWorld
) -> None:
    """Closed page, new request, page opened again: the request is there and alerts once;
    a reload shows it without alerting again. Requests already waiting on a mechanic's
    very first visit are listed, not alerted."""
    mo = await live.make("mo", "mechanic")
    ada = await live.make("ada", "admin")
    cara = await live.make("cara", "customer")
    page = await pages.signed_in("mechanic", "/mechanic", mo)
    context = page.context
    await page.close()

    pair = await queued(live, cara)
    assignment_id = pair["assignment"]["id"]
    page = await pages.open("mechanic-again", "/mechanic", context=context)
    await expect(card(page, assignment_id)).to_be_visible(timeout=SLOW)
    await expect(toast(page, assignment_id)).to_have_count(1, timeout=SLOW)
    await wait_for(lambda: receipts(live.db_url, mo), what="a receipt")

    await page.reload()
    await expect(page.locator("#connection")).to_have_text("Live", timeout=SLOW)
    await expect(card(page, assignment_id)).to_be_visible(timeout=SLOW)
    await fence(live, ada, page)
    await expect(page.locator(".toast")).to_have_count(0)
    assert len(receipts(live.db_url, mo)) == 1

    newcomer = await live.make("max", "mechanic")
    other = await pages.signed_in("mechanic-newcomer", "/mechanic", newcomer)
    await expect(card(other, assignment_id)).to_be_visible(timeout=SLOW)
    await fence(live, ada, other)
    await expect(other.locator(".toast")).to_have_count(0)
    assert receipts(live.db_url, newcomer) == []


async def test_the_dashboard_works_from_the_keyboard_on_a_phone(
    pages: Pages, live: LiveWorld
) -> None:
    """On a phone-sized screen, with the keyboard alone: sign in (Enter), reach Accept with
    Tab from the alert, take the request; the live region announced it."""
    mo = await live.make("mo", "mechanic")
    cara = await live.make("cara", "customer")
    page = await pages.open("mechanic", "/mechanic", viewport=PHONE)
    await page.get_by_label("Email", exact=True).press_sequentially(mo.email)
    await page.keyboard.press("Tab")
    await page.keyboard.type("password-123")
    await page.keyboard.press("Enter")
    await expect(page.locator("#connection")).to_have_text("Live", timeout=SLOW)
    pair = await queued(live, cara)
    assignment_id = pair["assignment"]["id"]
    await expect(toast(page, assignment_id)).to_be_visible(timeout=SLOW)
    await expect(page.locator("#announcer")).to_contain_text("New request: Dana")
    await pages.screenshot("mechanic", "phone", docs="mechanic-phone.png")
    await toast(page, assignment_id).get_by_role("button", name="View").focus()
    await page.keyboard.press("Enter")  # View: focus moves to the card's Accept button
    accept = card(page, assignment_id).get_by_role("button", name="Accept")
    await expect(accept).to_be_focused()
    await page.keyboard.press("Enter")
    await expect(page.locator("#active-session")).to_be_visible(timeout=SLOW)
    await expect(page.locator("#active-title")).to_be_focused()
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the page scrolls sideways on a phone ({width} px)"


async def test_the_page_refreshes_its_token_and_stays_subscribed(
    browser: Any, db_url: str, tmp_path: Any, request: pytest.FixtureRequest
) -> None:
    """With 8-second access tokens the page refreshes before each expires and sends the
    new one to its channels: it never drops to the sign-in form and alerts as usual."""
    server = LiveServer(db_url, tmp_path, access_token_ttl_seconds=8)
    live = LiveWorld(server, db_url, {})
    pages = Pages(browser, live, request.node.name)
    try:
        mo = await live.make("mo", "mechanic")
        cara = await live.make("cara", "customer")
        page = await pages.signed_in("mechanic", "/mechanic", mo)
        first = await page.evaluate("localStorage.getItem('autodispatch.auth.mechanic')")
        await asyncio.sleep(18)  # two token lifetimes
        assert await page.evaluate("localStorage.getItem('autodispatch.auth.mechanic')") != first
        await expect(page.locator("#connection")).to_have_text("Live")
        async with httpx.AsyncClient(base_url=server.base) as client:
            r = await client.post(
                "/auth/v1/token?grant_type=password",
                json={"email": cara.email, "password": "password-123"},
            )
            cara.token = r.json()["access_token"]
            pair = await live.queued(client, cara)
            metrics = (await client.get("/metrics")).text
        await expect(toast(page, pair["assignment"]["id"])).to_be_visible(timeout=SLOW)
        await expect(page.locator("#signin")).to_be_hidden()
        # Refreshed in time: the server never had to close a channel for an old token.
        assert 'reason="token_expired"' not in metrics
        assert not pages.errors, pages.errors
    finally:
        await pages.close()
        server.stop()
