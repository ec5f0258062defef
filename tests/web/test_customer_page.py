"""The customer page in a real browser: request, waiver, payment, live status, chat, end."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from web_browser import SLOW, Pages

from conftest import LiveWorld

pytestmark = pytest.mark.slow
pytest.importorskip(
    "playwright.async_api", reason="Playwright is not installed: the browser tests are skipped"
)
from playwright.async_api import expect  # noqa: E402

PHONE = {"width": 390, "height": 844}


async def describe_car(page: Any, *, paid: bool = False) -> None:
    await page.get_by_label("Year").fill("2019")
    await page.get_by_label("Make").fill("Honda")
    await page.get_by_label("Model").fill("Civic")
    await page.get_by_label("What is wrong?").fill("Squeal from the front left wheel")
    if paid:
        await page.get_by_label("Paid session").check()
    await page.get_by_role("button", name="Request a mechanic").click()


async def test_the_customer_follows_the_request_to_the_end_and_the_banner_goes(
    pages: Pages, live: LiveWorld
) -> None:
    """Waiting for a mechanic → "Mo accepted" → live (with chat both ways) → ended from
    the mechanic's side: the customer's banner disappears at once."""
    mo = await live.make("mo", "mechanic")
    cara = await live.make("cara", "customer")
    mechanic = await pages.signed_in("mechanic", "/mechanic", mo)
    customer = await pages.signed_in("customer", "/customer", cara, viewport=PHONE)
    await expect(customer.get_by_label("Your first name")).to_have_value("Cara")
    await pages.screenshot("customer", "form", docs="customer-form.png")

    await describe_car(customer)
    status = customer.locator("#session-status")
    banner = customer.locator("#banner")
    await expect(status).to_have_text("Sign the waiver to send your request.", timeout=SLOW)
    await customer.get_by_role("button", name="Sign the waiver").click()
    await expect(customer.locator("#session-message")).to_contain_text("Tick")
    await customer.get_by_label("I have read and agree to the waiver").check()
    await customer.get_by_role("button", name="Sign the waiver").click()
    await expect(status).to_have_text("Waiting for a mechanic…", timeout=SLOW)
    await expect(banner).to_contain_text("Waiting for a mechanic…")

    await mechanic.locator(".request-card").get_by_role("button", name="Accept").click()
    await expect(status).to_have_text("Mo accepted", timeout=SLOW)
    await expect(banner).to_contain_text("Mo accepted")
    await customer.get_by_role("button", name="Start session").click()
    await expect(status).to_have_text("Live with Mo", timeout=SLOW)
    await expect(mechanic.locator("#active-status")).to_have_text("Live now.", timeout=SLOW)

    await customer.get_by_label("Message").fill("Hello, it squeals when I brake.")
    await customer.get_by_role("button", name="Send").click()
    await expect(mechanic.locator(".chat-message .chat-body")).to_have_text(
        ["Hello, it squeals when I brake."], timeout=SLOW
    )
    await mechanic.get_by_label("Message").fill("Sounds like the pad wear indicator.")
    await mechanic.get_by_label("Message").press("Enter")
    await expect(customer.locator(".chat-message .chat-body")).to_have_text(
        ["Hello, it squeals when I brake.", "Sounds like the pad wear indicator."], timeout=SLOW
    )
    await pages.screenshot("customer", "live", docs="customer-live.png")
    await pages.screenshot("mechanic", "live", docs="mechanic-session.png")

    await mechanic.get_by_role("button", name="End session").click()
    await expect(banner).to_be_hidden(timeout=SLOW)
    await expect(customer.locator("#ended-text")).to_have_text(
        "Your session with Mo is complete.", timeout=SLOW
    )
    await expect(customer.locator("#chat")).to_be_hidden()
    await expect(mechanic.locator("#banner")).to_be_hidden()
    await expect(mechanic.locator("#active-session")).to_be_hidden()
    await pages.screenshot("customer", "ended", docs="customer-ended.png")

    await customer.get_by_role("button", name="Request another mechanic").click()
    await expect(customer.get_by_role("button", name="Request a mechanic")).to_be_visible()


async def test_a_new_customer_signs_up_pays_then_cancels_and_the_request_leaves_every_queue(
    pages: Pages, live: LiveWorld
) -> None:
    """Sign-up, a paid request (waiver, then the development payment), then Cancel: the
    banner goes and the mechanic's card goes with it."""
    mo = await live.make("mo", "mechanic")
    mechanic = await pages.signed_in("mechanic", "/mechanic", mo)
    customer = await pages.open("customer", "/customer", viewport=PHONE)
    await customer.get_by_label("Your name").fill("Nina Newcomer")
    await customer.get_by_label("Email address").fill("nina@live.example")
    await customer.get_by_label("Choose a password").fill("a-long-password")
    await customer.get_by_role("button", name="Create account").click()
    await expect(customer.locator("#connection")).to_have_text("Live", timeout=SLOW)
    await expect(customer.get_by_label("Your first name")).to_have_value("Nina")

    await describe_car(customer, paid=True)
    status = customer.locator("#session-status")
    await expect(status).to_have_text("Sign the waiver and pay to send your request.", timeout=SLOW)
    await customer.get_by_label("I have read and agree to the waiver").check()
    await customer.get_by_role("button", name="Sign the waiver").click()
    await expect(customer.locator("#waiver")).to_be_hidden(timeout=SLOW)
    await expect(mechanic.locator(".request-card")).to_have_count(0)  # not paid yet
    await customer.get_by_role("button", name="Pay (development)").click()
    await expect(status).to_have_text("Waiting for a mechanic…", timeout=SLOW)
    await expect(mechanic.locator(".request-card .badge").first).to_have_text("Paid", timeout=SLOW)

    await customer.get_by_role("button", name="Cancel request").click()
    await expect(customer.locator("#banner")).to_be_hidden(timeout=SLOW)
    await expect(customer.locator("#ended-text")).to_have_text("The request was cancelled.")
    await expect(mechanic.locator(".request-card")).to_have_count(0, timeout=SLOW)
    await expect(mechanic.locator(".toast")).to_have_count(0)


async def test_a_session_ended_elsewhere_clears_the_banner_of_a_page_that_was_offline(
    pages: Pages, live: LiveWorld
) -> None:
    """The customer's page is offline when the mechanic ends the session; back online it
    resumes and the banner goes."""
    mo = await live.make("mo", "mechanic")
    cara = await live.make("cara", "customer")
    async with httpx.AsyncClient(base_url=live.server.base) as client:
        pair = await live.queued(client, cara)
        r = await client.post(
            f"/api/assignments/{pair['assignment']['id']}/accept", headers=mo.headers
        )
        assert r.status_code == 200, r.text
        customer = await pages.signed_in("customer", "/customer", cara, viewport=PHONE)
        await expect(customer.locator("#banner")).to_contain_text("Mo accepted", timeout=SLOW)
        await customer.context.set_offline(True)
        await expect(customer.locator("#connection")).not_to_have_text("Live", timeout=SLOW)
        r = await client.post(f"/api/sessions/{pair['session']['id']}/end", headers=mo.headers)
        assert r.status_code == 200, r.text
    await customer.context.set_offline(False)
    await expect(customer.locator("#banner")).to_be_hidden(timeout=SLOW)
    await expect(customer.locator("#ended-text")).to_have_text("The request was cancelled.")
