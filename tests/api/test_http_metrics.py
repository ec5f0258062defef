"""HTTP metrics' labels stay bounded whatever a client sends."""

from __future__ import annotations

from page_helpers import metric

from conftest import World


async def test_unknown_methods_are_counted_as_other(world: World) -> None:
    """A request with a made-up method is counted under method OTHER: a client cannot add
    time series by inventing methods. Known methods keep their name."""
    for method in ("FROBNICATE", "X-1", "GETX"):
        r = await world.client.request(method, "/healthz")
        assert r.status_code == 405
    assert (await world.client.get("/healthz")).status_code == 200
    text = (await world.client.get("/metrics")).text
    assert "FROBNICATE" not in text and "GETX" not in text
    assert (
        await metric(
            world.client,
            "autodispatch_http_requests_total",
            route="/healthz",
            method="OTHER",
            status="405",
        )
        == 3
    )
    assert (
        await metric(
            world.client,
            "autodispatch_http_requests_total",
            route="/healthz",
            method="GET",
            status="200",
        )
        == 1
    )
