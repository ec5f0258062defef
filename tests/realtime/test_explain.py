"""`autodispatch explain-delivery` names the key or filter that decides a delivery."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg

from conftest import World, number_committed


def explain(db_url: str, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": db_url, "AUTODISPATCH_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "autodispatch", "explain-delivery", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_explain_says_why_each_user_does_or_does_not_get_an_event(
    world: World, tmp_path: Path
) -> None:
    """For a workshop request: its mechanic gets it through the workshop pool key; a rival
    workshop's mechanic does not, and the message shows the keys on both sides."""
    pair = await world.queued(workshop_id=world.workshop_id)
    db_url = world.app.state.services.db.url
    await number_committed(db_url)
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        cur = await conn.execute(
            "select id from realtime.events where table_name = 'session_assignments'"
            " and row_id = %s and record->>'status' = 'queued'",
            (pair["assignment"]["id"],),
        )
        row = await cur.fetchone()
    assert row is not None
    event_id = str(row[0])
    yes = explain(db_url, tmp_path, "--event", event_id, "--user", world.workshop_mechanic.email)
    assert yes.returncode == 0, yes.stdout + yes.stderr
    assert "DELIVERED" in yes.stdout and f"pool:workshop:{world.workshop_id}" in yes.stdout
    no = explain(
        db_url, tmp_path, "--event", event_id, "--user", world.rival_workshop_mechanic.email
    )
    assert no.returncode == 1
    assert "NOT DELIVERED" in no.stdout and "no key of the user" in no.stdout
    assert f"pool:workshop:{world.rival_workshop_id}" in no.stdout
    filtered = explain(
        db_url, tmp_path, "--event", event_id, "--user", world.workshop_mechanic.email,
        "--filter", "status=eq.accepted",
    )  # fmt: skip
    assert filtered.returncode == 1 and "filter" in filtered.stdout
    missing = explain(db_url, tmp_path, "--event", "999999", "--user", world.mechanic.email)
    assert missing.returncode == 1 and "no event 999999" in missing.stdout
