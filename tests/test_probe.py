"""The delivery probe (`autodispatch probe`) against a live server: it passes when delivery
works, and names the failing step (and the key or filter at fault) when it does not."""

from __future__ import annotations

import psycopg

from autodispatch.db.database import Database
from autodispatch.ops.probe import explain_missing, run_probe
from autodispatch.realtime.explain import Explanation, explain_delivery
from conftest import LiveWorld

PASSWORD = "password-123"


async def explain_ping(
    db_url: str, ping_id: str, email: str, row_filter: str | None = None
) -> Explanation:
    """What `autodispatch probe` says when the ping's event does not arrive."""
    db = Database(db_url, min_size=1, max_size=1)
    await db.open()
    try:
        event_id = await explain_missing(db, ping_id)
        assert event_id is not None, "the ping's insert was not logged"
        return await explain_delivery(db, event_id, email, row_filter=row_filter)
    finally:
        await db.close()


async def test_probe_passes_for_each_kind_of_account(live: LiveWorld) -> None:
    for name, kind in (("cora", "customer"), ("mick", "mechanic"), ("ada", "admin")):
        account = await live.make(name, kind)
        result = await run_probe(live.server.base, account.email, PASSWORD)
        assert result.ok, result.as_json()
        assert [s.name for s in result.steps] == [
            "config",
            "sign-in",
            "connect",
            "subscribe",
            "change",
            "delivery",
        ]
        assert result.user_id == str(account.id)
        assert result.latency_ms is not None and result.latency_ms >= 0
        assert result.commit_to_receive_ms is not None


async def test_a_wrong_password_fails_at_sign_in(live: LiveWorld) -> None:
    account = await live.make("cora", "customer")
    result = await run_probe(live.server.base, account.email, "not-the-password")
    assert not result.ok
    failed = result.failed
    assert failed is not None and failed.name == "sign-in"
    assert "invalid_grant" in failed.detail or "400" in failed.detail
    assert [s.name for s in result.steps] == ["config", "sign-in"]


async def test_an_unreachable_server_fails_at_config() -> None:
    result = await run_probe("http://127.0.0.1:9", "x@example.com", "pw", timeout=2)
    assert result.failed is not None and result.failed.name == "config"


async def test_a_filter_that_hides_the_change_is_named(live: LiveWorld) -> None:
    account = await live.make("cora", "customer")
    result = await run_probe(
        live.server.base, account.email, PASSWORD, row_filter="nonce=eq.nothing", timeout=2
    )
    failed = result.failed
    assert failed is not None and failed.name == "delivery"
    assert result.ping_id is not None
    why = await explain_ping(live.db_url, result.ping_id, account.email, "nonce=eq.nothing")
    assert not why.delivered
    assert "filter 'nonce=eq.nothing' does not match" in why.text


async def test_a_missing_visibility_key_is_named(live: LiveWorld) -> None:
    """A broken visibility rule (the first version's silent failure): the ping is written
    with keys the user does not hold; the probe fails at delivery and the explanation
    lists the row's keys against the user's, so the missing key shows."""
    account = await live.make("cora", "customer")
    with psycopg.connect(live.db_url, autocommit=True) as conn:
        conn.execute(
            "create or replace function public.probe_visibility_keys(p public.probe_pings)"
            " returns text[] language sql immutable as $$ select array['user:nobody'] $$"
        )
    result = await run_probe(live.server.base, account.email, PASSWORD, timeout=2)
    failed = result.failed
    assert failed is not None and failed.name == "delivery"
    assert result.ping_id is not None
    why = await explain_ping(live.db_url, result.ping_id, account.email)
    assert not why.delivered
    assert "'user:nobody'" in why.text
    assert f"'user:{account.id}'" in why.text
    assert "it would need one of user:nobody" in why.text
