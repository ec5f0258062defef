"""The routes that serve the pages, their static files and the service worker (no browser)."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from conftest import World


class Scripts(HTMLParser):
    """The attributes of every <script>, and every inline event handler (onclick=...)."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.handlers: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.scripts.append(dict(attrs))
        self.handlers += [f"<{tag} {name}>" for name, _ in attrs if name.startswith("on")]


@pytest.mark.parametrize("path", ["/", "/mechanic", "/customer", "/admin", "/probe"])
async def test_each_page_is_html_with_a_strict_content_security_policy(
    world: World, path: str
) -> None:
    """Pages are HTML, revalidated on every load, and may run only our own scripts: every
    <script> is a module loaded from /static/, none is inline, no element has an on*
    handler (the policy would block them: a page relying on one would be broken)."""
    r = await world.client.get(path)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert r.headers["cache-control"] == "no-cache"
    assert "script-src 'self'" in r.headers["content-security-policy"]
    parsed = Scripts()
    parsed.feed(r.text)
    parsed.close()
    assert r.text.lower().count("<script") == len(parsed.scripts)
    for script in parsed.scripts:
        assert (script.get("src") or "").startswith("/static/"), f"{path}: inline {script}"
        assert script.get("type") == "module", f"{path}: {script}"
    assert parsed.handlers == [], path


async def test_static_files_have_their_type_and_answer_304_when_unchanged(world: World) -> None:
    """A module is served as JavaScript with an ETag; the same ETag again gets a 304."""
    r = await world.client.get("/static/realtime.js")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/javascript")
    again = await world.client.get(
        "/static/realtime.js", headers={"If-None-Match": r.headers["etag"]}
    )
    assert again.status_code == 304
    assert (
        (await world.client.get("/static/app.css")).headers["content-type"].startswith("text/css")
    )


@pytest.mark.parametrize(
    "path", ["/static/../pages.py", "/static/%2e%2e/pages.py", "/static/", "/static/nope.js"]
)
async def test_nothing_outside_the_static_folder_is_served(world: World, path: str) -> None:
    """Paths that climb out of static/, folders and unknown files are 404."""
    assert (await world.client.get(path)).status_code == 404


async def test_the_service_worker_is_served_from_the_root_so_its_scope_covers_mechanic(
    world: World,
) -> None:
    """/mechanic-sw.js is JavaScript at the root path: a scope of /mechanic is allowed."""
    r = await world.client.get("/mechanic-sw.js")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/javascript")
    assert "addEventListener('push'" in r.text
