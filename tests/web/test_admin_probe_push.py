"""The admin and probe pages, and the mechanics' service worker, in a real browser."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from web_browser import SLOW, Pages, receipts, set_flag, wait_for

from conftest import LiveWorld

pytestmark = pytest.mark.slow
pytest.importorskip(
    "playwright.async_api", reason="Playwright is not installed: the browser tests are skipped"
)
from playwright.async_api import expect  # noqa: E402

# A browser that has never been asked (permission "default"), counting the asks.
COUNT_PERMISSION_REQUESTS = """
window.__permissionRequests = 0;
let permission = 'default';
Object.defineProperty(Notification, 'permission', { get: () => permission });
Notification.requestPermission = async () => {
  window.__permissionRequests += 1;
  permission = 'granted';
  return permission;
};
"""
NOTIFICATION_TAGS = (
    "navigator.serviceWorker.getRegistration('/mechanic')"
    ".then(r => r.getNotifications()).then(list => list.map(n => n.tag))"
)


async def test_the_admin_toggles_flags_live_sees_the_queue_and_who_is_online_and_offers(
    pages: Pages, live: LiveWorld
) -> None:
    """Flags flip on the mechanic's page as the admin toggles them; the queue shows the
    request with its age; presence lists the mechanic under the key its page learnt from
    the server; an offer reaches the chosen mechanic, who declines it; delivery health
    counts both alerts."""
    mo = await live.make("mo", "mechanic")
    ada = await live.make("ada", "admin")
    cara = await live.make("cara", "customer")
    mechanic = await pages.signed_in("mechanic", "/mechanic", mo)
    admin = await pages.signed_in("admin", "/admin", ada)
    await expect(admin.locator("#online-list li")).to_have_text(["Mo"], timeout=SLOW)
    # The mechanic's page knows the key the server listed it under (its own wish aside).
    status = mechanic.locator("#connection")
    await expect(status).to_have_attribute("data-presence", "listed", timeout=SLOW)
    key = await status.get_attribute("data-presence-key")
    await expect(admin.locator("#online-list li")).to_have_attribute("data-user-id", str(key))

    switch = admin.get_by_role("switch", name="mech_audio_alerts")
    await expect(switch).to_be_checked(timeout=SLOW)
    await switch.uncheck()
    flag = mechanic.locator('#flag-list li[data-flag="mech_audio_alerts"]')
    await expect(flag).to_have_attribute("data-enabled", "false", timeout=SLOW)
    await switch.check()
    await expect(flag).to_have_attribute("data-enabled", "true", timeout=SLOW)

    async with httpx.AsyncClient() as client:
        pair = await live.queued(client, cara)
    assignment_id = pair["assignment"]["id"]
    row = admin.locator(f'#queue-rows tr[data-assignment-id="{assignment_id}"]')
    await expect(row).to_contain_text("Dana · 2016 Toyota Corolla", timeout=SLOW)
    await expect(row.locator("td.age")).to_have_text(re.compile(r"^\d+ s$"))
    await expect(mechanic.locator(".toast")).to_have_count(1, timeout=SLOW)

    await row.get_by_label("Mechanic for Dana · 2016 Toyota Corolla").select_option(label="Mo")
    await row.get_by_role("button", name="Offer").click()
    await expect(admin.locator("#queue-message")).to_contain_text("Offered to Mo", timeout=SLOW)
    await expect(row).to_contain_text("offered to Mo", timeout=SLOW)
    offer = mechanic.locator(f'.request-card[data-assignment-id="{assignment_id}"]')
    await expect(offer.locator(".badge.offer")).to_have_text("Offered to you", timeout=SLOW)
    await pages.screenshot("admin", "offered")
    await offer.get_by_role("button", name="Decline").click()
    await expect(mechanic.locator("#queue-message")).to_contain_text("Offer declined", timeout=SLOW)
    await expect(offer.locator(".badge.offer")).to_have_count(0, timeout=SLOW)
    await expect(row).not_to_contain_text("offered to", timeout=SLOW)

    # Two alerts: the new request, then the offer to Mo.
    await wait_for(lambda: len(receipts(live.db_url, mo)) == 2, what="two receipts")
    await admin.get_by_role("button", name="Refresh").click()
    shown = admin.locator('#health-tiers tr[data-tier="toast"] td[data-status="shown"]')
    await expect(shown).to_have_text("2", timeout=SLOW)
    await expect(admin.locator("#health-latency")).to_contain_text("2 alerts")
    await pages.screenshot("admin", "health", docs="admin.png")

    await mechanic.close()
    await expect(admin.locator("#online-list li")).to_have_count(0, timeout=SLOW)
    await expect(admin.locator("#online-empty")).to_be_visible()


async def test_the_probe_lists_every_event_with_its_latency(pages: Pages, live: LiveWorld) -> None:
    """Signed in as a customer, the probe shows its own test change (with commit-to-here
    latency and round trip) and a flag change everyone may see."""
    cara = await live.make("cara", "customer")
    ada = await live.make("ada", "admin")
    probe = await pages.signed_in("probe", "/probe", cara)
    await probe.get_by_role("button", name="Send a test change").click()
    await expect(probe.locator("#ping-status")).to_contain_text(
        "Your test change arrived", timeout=SLOW
    )
    row = probe.locator('#events tr[data-table="probe_pings"]')
    await expect(row).to_have_count(1)
    await expect(row.locator("td.latency")).to_have_text(re.compile(r"^\d+ ms$"))
    await set_flag(live, ada, "mech_audio_alerts", False)
    await expect(probe.locator('#events tr[data-table="feature_flags"]')).to_have_count(
        1, timeout=SLOW
    )
    await expect(probe.locator("#cursor")).not_to_have_text("none")
    # One connection all along: delivering events never cost a reconnect.
    await expect(probe.locator("#log li", has_text="socket: connected")).to_have_count(1)
    await expect(probe.locator("#log li", has_text="socket: closed")).to_have_count(0)
    await pages.screenshot("probe", "events", docs="probe.png")


async def test_notifications_are_asked_for_only_on_a_click(pages: Pages, live: LiveWorld) -> None:
    """Loading and signing in never asks for notification permission; the button does,
    and says plainly when closed-page push is unavailable in this browser."""
    mo = await live.make("mo", "mechanic")
    mechanic = await pages.signed_in(
        "mechanic", "/mechanic", mo, init_script=COUNT_PERMISSION_REQUESTS
    )
    await expect(mechanic.locator("#notification-status")).to_have_text(
        "System notifications are off until you enable them."
    )
    assert await mechanic.evaluate("window.__permissionRequests") == 0
    await mechanic.get_by_role("button", name="Enable notifications").click()
    await expect(mechanic.locator("#notification-status")).to_contain_text(
        "Notifications are on", timeout=SLOW
    )
    assert await mechanic.evaluate("window.__permissionRequests") == 1


async def test_the_service_worker_shows_a_push_only_when_no_mechanic_page_is_visible(
    pages: Pages, live: LiveWorld
) -> None:
    """A push (delivered through the DevTools protocol) shows nothing while a mechanic
    page is visible, and a notification tagged by the request once none is."""
    mo = await live.make("mo", "mechanic")
    context = await pages.context()
    await context.grant_permissions(["notifications"], origin=live.server.base)
    page = await context.new_page()
    cdp = await context.new_cdp_session(page)
    registrations: dict[str, str] = {}

    def seen(event: dict[str, Any]) -> None:
        for registration in event["registrations"]:
            registrations[registration["scopeURL"]] = registration["registrationId"]

    cdp.on("ServiceWorker.workerRegistrationUpdated", seen)
    await cdp.send("ServiceWorker.enable")
    pages.named["mechanic"] = page
    await page.goto(live.server.base + "/mechanic")
    await pages.sign_in(page, mo)
    await expect(page.locator("#connection")).to_have_text("Live", timeout=SLOW)
    assert await page.evaluate("navigator.serviceWorker.ready.then(r => r.scope)") == (
        live.server.base + "/mechanic"
    )
    registration_id = await wait_for(
        lambda: registrations.get(live.server.base + "/mechanic"), what="the registration"
    )

    async def push(assignment_id: str) -> None:
        payload = {
            "assignment_id": assignment_id,
            "event_id": 1,
            "request_summary": {
                "customer_first_name": "Zed",
                "vehicle": "2001 Volvo V70",
                "concern": "Rattle",
            },
        }
        await cdp.send(
            "ServiceWorker.deliverPushMessage",
            {
                "origin": live.server.base,
                "registrationId": registration_id,
                "data": json.dumps(payload),
            },
        )

    await push("while-visible")
    await page.goto(live.server.base + "/probe")  # no mechanic page open any more
    await push("while-closed")
    # The list is taken, polling in the page every 20 ms, at the moment it holds the second
    # push's tag: headless Chromium may drop a shown notification again soon after, which
    # is not ours to test. (Not wait_for_function: it takes a returned Promise as truthy
    # and hands back its first value, so it did not wait at all.)
    shown = await page.evaluate(
        f"""(async () => {{
          const end = Date.now() + {SLOW};
          for (;;) {{
            const tags = await {NOTIFICATION_TAGS};
            if (tags.includes('request-while-closed') || Date.now() > end) return tags;
            await new Promise(resolve => setTimeout(resolve, 20));
          }}
        }})()"""
    )
    assert shown == ["request-while-closed"]
