"""Helpers for the browser tests: Debian's Chromium driven by Playwright (async API).

Where ``/usr/bin/chromium`` (or ``AUTODISPATCH_CHROMIUM``) does not exist, or Playwright
is not installed, the tests are skipped with a message saying so. Screenshots of every
page a test opened are saved at its end under ``AUTODISPATCH_TEST_ARTIFACTS`` (default:
``test-artifacts/`` in the repository, ignored by git), one folder per test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from conftest import Account, LiveWorld

CHROMIUM = Path(os.environ.get("AUTODISPATCH_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = Path(
    os.environ.get(
        "AUTODISPATCH_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"
    )
)
DOCS_SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
SLOW = 20_000  # ms: generous, for a slow shared machine (the 2 s budget is asserted apart)
PASSWORD = "password-123"


def require_chromium() -> None:
    if not CHROMIUM.exists():
        pytest.skip(
            f"no Chromium at {CHROMIUM}: the browser tests are skipped"
            " (install it with `apt-get install -y chromium`, or set AUTODISPATCH_CHROMIUM)"
        )


@contextlib.asynccontextmanager
async def launch() -> AsyncIterator[Any]:
    """A Chromium browser for a module's tests."""
    require_chromium()
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()


class Pages:
    """The pages one test opens, each in its own browser context (its own storage), plus
    what their consoles said; screenshots of all of them are saved at the end."""

    def __init__(self, browser: Any, live: LiveWorld, test_name: str) -> None:
        self.browser = browser
        self.live = live
        self.base = live.server.base
        self.folder = ARTIFACTS / "web" / re.sub(r"[^\w.-]+", "_", test_name)
        self.contexts: list[Any] = []
        self.named: dict[str, Any] = {}
        self.errors: list[str] = []

    async def context(self, **options: Any) -> Any:
        context = await self.browser.new_context(**options)
        self.contexts.append(context)
        return context

    async def open(
        self,
        name: str,
        path: str,
        *,
        context: Any = None,
        init_script: str | None = None,
        **context_options: Any,
    ) -> Any:
        """A new page (in a new context unless one is given) at ``path``."""
        context = context or await self.context(**context_options)
        if init_script:
            await context.add_init_script(init_script)
        page = await context.new_page()
        page.on("pageerror", lambda error: self.errors.append(f"{name}: {error}"))
        self.named[name] = page
        await page.goto(self.base + path)
        return page

    async def sign_in(self, page: Any, account: Account) -> None:
        await page.get_by_label("Email", exact=True).fill(account.email)
        await page.get_by_label("Password", exact=True).fill(PASSWORD)
        await page.get_by_role("button", name="Sign in").click()

    async def signed_in(self, name: str, path: str, account: Account, **options: Any) -> Any:
        """A page at ``path`` signed in as ``account``, once its realtime is live."""
        from playwright.async_api import expect

        page = await self.open(name, path, **options)
        await self.sign_in(page, account)
        await expect(page.locator("#connection")).to_have_text("Live", timeout=SLOW)
        return page

    async def screenshot(self, name: str, step: str, *, docs: str | None = None) -> None:
        """Save a screenshot of one page; also into docs/screenshots when ``docs`` names
        a file and AUTODISPATCH_UPDATE_SCREENSHOTS is set."""
        page = self.named[name]
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}-{step}.png"
        await page.screenshot(path=str(path), full_page=True)
        if docs and os.environ.get("AUTODISPATCH_UPDATE_SCREENSHOTS"):
            DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            (DOCS_SCREENSHOTS / docs).write_bytes(path.read_bytes())

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            for name, page in self.named.items():
                if not page.is_closed():
                    await self.screenshot(name, "end")
        for context in self.contexts:
            with contextlib.suppress(Exception):
                await context.close()


def receipts(db_url: str, account: Account) -> list[dict[str, Any]]:
    """The alert receipts a mechanic's pages recorded, oldest first."""
    with psycopg.connect(db_url) as conn:
        cur = conn.execute(
            "select assignment_id::text, event_id, tiers, commit_to_shown_ms"
            " from public.alert_receipts where mechanic_user_id = %s order by created_at",
            (account.id,),
        )
        names = [c.name for c in cur.description or []]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


async def wait_for(predicate: Any, timeout: float = SLOW / 1000, what: str = "a condition") -> Any:
    """Poll a (quick, synchronous) check until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.1)


async def set_flag(live: LiveWorld, admin: Account, key: str, enabled: bool) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=live.server.base) as client:
        r = await client.patch(
            f"/api/feature-flags/{key}", json={"enabled": enabled}, headers=admin.headers
        )
        assert r.status_code == 200, r.text
