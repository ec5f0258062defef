"""The routes that serve the pages, their static files and the service worker (no browser)."""

from __future__ import annotations

import pytest

from conftest import World


@pytest.mark.parametrize("path", ["/", "/mechanic", "/customer", "/admin", "/probe"])
async def test_each_page_is_html_with_a_strict_content_security_policy(
    world: World, path: str
) -> None:
    """Pages are HTML, revalidated on every load, and may run only our own scripts."""
    r = await world.client.get(path)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert r.headers["cache-control"] == "no-cache"
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert "<script" not in r.text or 'type="module" src="/static/' in r.text


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
