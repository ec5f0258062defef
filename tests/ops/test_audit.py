"""`autodispatch audit`: a database only this code wrote has no findings; each kind of
damage done behind the code's back is named, with its rows and its fix."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from ops_helpers import (
    audit,
    behind_our_back,
    every_kind_of_session,
    finding,
    repair_audit_rows,
    run_repair,
    running_world,
    sql,
)

from conftest import database_url


async def test_a_database_only_this_code_wrote_has_no_findings(db_url: str, tmp_path: Path) -> None:
    """Every state the API reaches passes every check; the running server is a live gateway."""
    async with running_world(db_url, tmp_path) as world:
        await every_kind_of_session(world)
        report = await audit(db_url)
        assert report.ok, [f.as_json() for f in report.findings]
        assert len(report.checks) >= 14
        gateways = report.facts["gateways"]
        assert [g["live"] for g in gateways] == [True]
        assert report.facts["event_log"]["last_id"] > 0
    report = await audit(db_url)
    assert report.ok and report.facts["gateways"] == []  # a clean stop forgets the gateway


async def test_a_session_completed_behind_our_back_is_named_then_repaired(
    db_url: str, tmp_path: Path
) -> None:
    """The first version's bug: a completed session whose assignment stays accepted. Audit
    names it; repair completes the assignment with an audit row and tells subscribers."""
    async with running_world(db_url, tmp_path) as world:
        made = await every_kind_of_session(world)
        sid = made["waiting"]["session"]["id"]
        aid = made["waiting"]["assignment"]["id"]
        behind_our_back(db_url, f"update sessions set status = 'completed' where id = '{sid}'")

        report = await audit(db_url)
        assert not report.ok
        f = finding(report, "ended_session_open_assignment")
        assert f.area == "data" and f.repairable and f.count == 1
        assert f.rows == [
            {
                "session_id": uuid.UUID(sid),
                "assignment_id": uuid.UUID(aid),
                "session_status": "completed",
                "assignment_status": "accepted",
            }
        ]
        assert "completed/accepted: 1" in f.message and "repair --apply" in f.fix

        fixed = await run_repair(db_url)
        assert fixed.found == fixed.kinds[1].fixed == 1
        assert sql(db_url, "select status from session_assignments where id = %s", (aid,)) == [
            ("completed",)
        ]
        assert repair_audit_rows(db_url, sid) == [("assignment", "accepted", "completed")]
        events = sql(
            db_url,
            "select record->>'status' from realtime.events where row_id = %s order by id",
            (aid,),
        )
        assert events[-1] == ("completed",)  # the queues hear of it

        assert (await audit(db_url)).ok
        again = await run_repair(db_url)
        assert again.found == 0


CASES = [
    # (state made through the API, damage, finding, (session, assignment) after repair)
    (
        "queued",
        "update session_assignments set status = 'accepted', mechanic_id = '{mechanic}'"
        " where id = '{aid}'",
        "accepted_assignment_session_pending",
        ("waiting", "accepted"),
    ),
    (
        "waiting",
        "update session_assignments set status = 'expired' where id = '{aid}'",
        "ended_assignment_open_session",
        ("cancelled", "expired"),
    ),
    (
        "live",
        "update session_assignments set status = 'queued' where id = '{aid}'",
        "unaccepted_assignment_session_started",
        ("live", "accepted"),
    ),
    (
        "queued",
        "update sessions set status = 'waiting' where id = '{sid}'",
        "unaccepted_assignment_session_started",
        ("pending", "queued"),
    ),
    (
        "completed",
        "update session_assignments set status = 'cancelled' where id = '{aid}'",
        "ended_differently",
        ("completed", "completed"),
    ),
    (
        "cancelled_queued",
        "update sessions set status = 'live' where id = '{sid}'",
        "ended_assignment_open_session",
        ("cancelled", "cancelled"),
    ),
    (
        "offered",
        "update sessions set status = 'cancelled' where id = '{sid}'",
        "ended_session_open_assignment",
        ("cancelled", "cancelled"),
    ),
]


@pytest.mark.parametrize(("state", "damage", "code", "after"), CASES)
async def test_each_kind_of_disagreement_is_named_and_settled(
    db_url: str, tmp_path: Path, state: str, damage: str, code: str, after: tuple[str, str]
) -> None:
    """Each disagreeing pair is its own finding, names its session, and repair settles it
    on the pair reconcile.settle gives, every move with an audit row."""
    async with running_world(db_url, tmp_path) as world:
        made = await every_kind_of_session(world)
        sid, aid = made[state]["session"]["id"], made[state]["assignment"]["id"]
        behind_our_back(
            db_url, damage.format(sid=sid, aid=aid, mechanic=world.mechanic.mechanic_id)
        )
        before = sql(
            db_url,
            "select s.status, a.status from sessions s join session_assignments a"
            " on a.session_id = s.id where s.id = %s",
            (sid,),
        )[0]

        report = await audit(db_url)
        # Moving an assignment behind the code's back can also leave its session's keys stale.
        assert code in report.codes(), [f.as_json() for f in report.findings]
        assert report.codes() <= {code, "stale_session_keys"}
        assert [str(r["session_id"]) for r in finding(report, code).rows] == [sid]

        await run_repair(db_url)
        now = sql(
            db_url,
            "select s.status, a.status, a.offered_to, a.mechanic_id is not null"
            " from sessions s join session_assignments a on a.session_id = s.id where s.id = %s",
            (sid,),
        )[0]
        assert now[:2] == after
        assert now[2] is None  # no offer left open
        if after[1] in ("accepted", "completed"):
            assert now[3]  # with the session's mechanic
        moves = repair_audit_rows(db_url, sid)
        expected = []
        if before[1] != after[1]:
            expected.append(("assignment", before[1], after[1]))
        if before[0] != after[0]:
            expected.append(("session", before[0], after[0]))
        assert moves == expected
        report = await audit(db_url)
        assert report.ok, [f.as_json() for f in report.findings]


async def test_a_session_without_assignment_gets_the_one_it_should_have(
    db_url: str, tmp_path: Path
) -> None:
    """Report 6 of the first version: sessions with no assignment row. A queued one gets a
    queued assignment (mechanics see it again), a completed one a completed assignment."""
    async with running_world(db_url, tmp_path) as world:
        made = await every_kind_of_session(world)
        lost = {k: made[k]["session"]["id"] for k in ("queued", "completed", "pending_waiver")}
        for sid in lost.values():
            behind_our_back(db_url, f"delete from session_assignments where session_id = '{sid}'")
        assert world.mechanic.mechanic_id is not None
        assert made["queued"]["assignment"]["id"] not in await world.queue_ids(world.mechanic)

        report = await audit(db_url)
        f = finding(report, "session_without_assignment")
        assert {str(r["session_id"]) for r in f.rows} == set(lost.values()) and f.count == 3

        await run_repair(db_url)
        for key, status in (
            ("queued", "queued"),
            ("completed", "completed"),
            ("pending_waiver", "pending_waiver"),
        ):
            assert sql(
                db_url,
                "select status from session_assignments where session_id = %s",
                (lost[key],),
            ) == [(status,)]
            assert repair_audit_rows(db_url, lost[key]) == [("assignment", None, status)]
        queue = await world.queue_ids(world.mechanic)
        new_id = sql(
            db_url, "select id from session_assignments where session_id = %s", (lost["queued"],)
        )[0][0]
        assert str(new_id) in queue
        assert (await audit(db_url)).ok


async def test_offers_and_requests_past_their_time_are_returned_and_expired(
    db_url: str, tmp_path: Path
) -> None:
    """With no server running to expire them, an offer past its expiry and a request past
    its time to live are findings; repair moves them as the expiry task would."""
    async with running_world(db_url, tmp_path) as world:
        made = await every_kind_of_session(world)
    offered = made["offered"]["assignment"]["id"]
    queued, queued_session = made["queued"]["assignment"]["id"], made["queued"]["session"]["id"]
    sql(
        db_url,
        "update session_assignments set offer_expires_at = now() - interval '1 hour' where id = %s",
        (offered,),
    )
    sql(
        db_url,
        "update session_assignments set queued_at = now() - interval '2 hours' where id = %s",
        (queued,),
    )

    report = await audit(db_url, request_ttl_seconds=3600)
    assert report.codes() == {"offer_past_expiry", "request_past_ttl"}
    assert [str(r["assignment_id"]) for r in finding(report, "offer_past_expiry").rows] == [offered]
    assert [str(r["assignment_id"]) for r in finding(report, "request_past_ttl").rows] == [queued]
    assert (await audit(db_url, request_ttl_seconds=3 * 3600)).codes() == {"offer_past_expiry"}

    await run_repair(db_url, request_ttl_seconds=3600)
    assert sql(
        db_url, "select status, offered_to from session_assignments where id = %s", (offered,)
    ) == [("queued", None)]
    assert sql(db_url, "select status from sessions where id = %s", (queued_session,)) == [
        ("cancelled",)
    ]
    assert repair_audit_rows(db_url, queued_session) == [
        ("assignment", "queued", "expired"),
        ("session", "pending", "cancelled"),
    ]
    assert (await audit(db_url, request_ttl_seconds=3600)).ok


async def test_stale_session_keys_are_recomputed(db_url: str, tmp_path: Path) -> None:
    """A session whose stored visibility keys are not its assignment's is a finding (the
    mechanic who took it cannot read it); repair recomputes them and notes it."""
    async with running_world(db_url, tmp_path) as world:
        made = await every_kind_of_session(world)
        sid = made["waiting"]["session"]["id"]
        behind_our_back(
            db_url, f"update sessions set visibility_keys = '{{admin}}' where id = '{sid}'"
        )
        r = await world.client.get(f"/api/sessions/{sid}", headers=world.mechanic.headers)
        assert r.status_code == 404

        report = await audit(db_url)
        assert [str(r["session_id"]) for r in finding(report, "stale_session_keys").rows] == [sid]
        await run_repair(db_url)
        r = await world.client.get(f"/api/sessions/{sid}", headers=world.mechanic.headers)
        assert r.status_code == 200
        assert repair_audit_rows(db_url, sid) == [("session", "waiting", "waiting")]
        assert (await audit(db_url)).ok


async def test_events_no_server_numbered_are_a_finding_and_repair_numbers_them(
    db_url: str,
) -> None:
    """Events that committed while no server ran its sequencer have no id, so nobody
    received them: once older than the grace period they are a finding. Repair numbers
    them as a server would: all of them, in the order written, after every delivered one.
    A fresh one (a server would number it within its poll interval) is not a finding."""
    insert = (
        "insert into realtime.events (schema_name, table_name, type, row_id, record, at)"
        " values ('public', 'feature_flags', 'UPDATE', %s, '{}'::jsonb, now() - %s::interval)"
    )
    sql(db_url, "update feature_flags set enabled = false where key = 'mech_audio_alerts'")
    sql(db_url, "select realtime.sequence(10000)")
    head = sql(db_url, "select last_id from realtime.stream")[0][0]
    with psycopg.connect(db_url, autocommit=True) as conn:
        for key in ("a", "a", "b"):
            conn.execute(insert, (key, "1 minute"))
        conn.execute(insert, ("fresh", "0 seconds"))

    f = finding(await audit(db_url), "event_without_id")
    assert f.count == 3 and [r["row_id"] for r in f.rows] == ["a", "a", "b"]

    report = await run_repair(db_url)
    kind = next(k for k in report.kinds if k.code == "event_without_id")
    assert (kind.found, kind.fixed) == (3, 3)
    with psycopg.connect(db_url, autocommit=True) as conn:  # sql() would number the rest
        rows = conn.execute(
            "select id, row_id from realtime.events where seq > (select max(seq) from"
            " realtime.events where id = %s) order by seq",
            (head,),
        ).fetchall()
    assert rows == [(head + 1, "a"), (head + 2, "a"), (head + 3, "b"), (None, "fresh")]
    assert (await audit(db_url)).ok, "the fresh one is a server's to number, not a finding"


async def test_gateways_that_died_or_lag_are_named(db_url: str) -> None:
    """A heartbeat that stopped is a gateway that died (repair forgets it); one far behind
    the log lags (for a person to look at: repair leaves it)."""
    sql(db_url, "update feature_flags set enabled = false where key = 'mech_audio_alerts'")
    sql(db_url, "update realtime.events set at = now() - interval '5 minutes'")
    sql(db_url, "update realtime.push_cursor set last_id = (select last_id from realtime.stream)")
    dead, slow = uuid.uuid4(), uuid.uuid4()
    sql(
        db_url,
        "insert into realtime.gateways (id, host, pid, version, heartbeat_seconds, position,"
        " started_at, seen_at) values"
        " (%s, 'gone-host', 11, '0.1.0', 5, 0, now() - interval '2 hours',"
        "  now() - interval '1 hour'),"
        " (%s, 'slow-host', 22, '0.1.0', 5, 0, now() - interval '1 hour', now())",
        (dead, slow),
    )
    report = await audit(db_url)
    assert report.codes() == {"gateway_stopped", "gateway_lagging"}
    stopped = finding(report, "gateway_stopped")
    assert [r["gateway"] for r in stopped.rows] == [dead] and stopped.repairable
    lagging = finding(report, "gateway_lagging")
    assert [r["gateway"] for r in lagging.rows] == [slow] and not lagging.repairable
    assert lagging.rows[0]["lag_seconds"] >= 299
    assert report.facts["oldest_undelivered_event"]["gateway"] == slow

    await run_repair(db_url)
    assert sql(db_url, "select id from realtime.gateways") == [(slow,)]
    assert (await audit(db_url)).codes() == {"gateway_lagging"}


async def test_the_push_cursor_is_checked_and_its_lag_reported(db_url: str) -> None:
    """The Web Push cursor's lag is a fact; far behind while a gateway is live, it is a
    warning (with no server running nothing sends, so it is not); ahead of the log or
    gone, it is an error."""
    sql(db_url, "update feature_flags set enabled = false where key = 'mech_audio_alerts'")
    sql(db_url, "update feature_flags set enabled = true where key = 'mech_audio_alerts'")
    sql(db_url, "update realtime.events set at = now() - interval '5 minutes'")
    report = await audit(db_url)
    assert report.ok, [f.as_json() for f in report.findings]  # nothing runs: nothing sends
    cursor = report.facts["push_cursor"]
    assert (cursor["behind"], cursor["stream_last_id"]) == (2, cursor["push_position"] + 2)
    assert cursor["lag_seconds"] >= 299

    sql(
        db_url,
        "insert into realtime.gateways (id, host, pid, version, heartbeat_seconds, position)"
        " values (%s, 'here', 1, '0.1.0', 5, (select last_id from realtime.stream))",
        (uuid.uuid4(),),
    )
    behind = finding(await audit(db_url), "push_cursor_behind")
    assert behind.severity == "warning" and behind.rows[0]["behind"] == 2
    assert "push_run_failed" in behind.fix
    sql(db_url, "update realtime.push_cursor set last_id = (select last_id from realtime.stream)")
    assert (await audit(db_url)).ok

    sql(db_url, "update realtime.push_cursor set last_id = last_id + 5")
    assert (await audit(db_url)).codes() == {"push_cursor_ahead"}
    sql(db_url, "delete from realtime.push_cursor")
    missing = finding(await audit(db_url), "push_cursor_missing")
    assert "insert into realtime.push_cursor" in missing.fix


async def test_schema_damage_is_named_with_its_fix(db_url: str) -> None:
    """Disabled or missing triggers, broad or writing policies, write grants, RLS off, a
    missing policy, a stale revision, statuses the constraints and the guard disagree on."""
    sql(
        db_url,
        """
        alter table sessions disable trigger sessions_guard;
        drop trigger a_realtime_capture on feature_flags;
        drop trigger principal_changed on mechanics;
        create policy "Mechanics can view assignments for realtime" on session_assignments
          for select to authenticated using (true);
        create policy "writes" on sessions for update to authenticated using (true);
        create policy "restrictive" on payments as restrictive for select to anon using (false);
        grant insert on payments to anon;
        alter table waivers disable row level security;
        drop policy intakes_visible on intakes;
        update alembic_version set version_num = '0003';
        alter table session_assignments drop constraint session_assignments_status_check;
        alter table session_assignments add constraint session_assignments_status_check
          check (status in ('pending_waiver', 'queued', 'offered', 'accepted', 'declined',
                            'cancelled', 'expired'));
        delete from lifecycle_transitions where entity = 'session' and to_status = 'live';
        """,
    )
    report = await audit(db_url)
    assert report.codes() == {
        "trigger_disabled",
        "trigger_missing",
        "policy_too_broad",
        "policy_grants_writes",
        "policy_unexpected",
        "write_privilege_granted",
        "rls_disabled",
        "policy_missing",
        "migrations_behind",
        "status_not_allowed",
        "status_not_in_lifecycle",
        "transition_table_differs",
    }
    assert all(f.area == "schema" and not f.repairable for f in report.findings)

    def rows(code: str) -> list[dict[str, Any]]:
        return finding(report, code).rows

    assert rows("trigger_disabled")[0]["trigger"] == "sessions_guard"
    assert sorted(rows("trigger_missing"), key=lambda r: r["table"]) == [
        {
            "table": "public.feature_flags",
            "trigger": "a_realtime_capture",
            "purpose": "writes every change to the event log (realtime delivery)",
        },
        {
            "table": "public.mechanics",
            "trigger": "principal_changed",
            "purpose": (
                "tells the gateways when what a user may see changes (re-keys subscriptions)"
            ),
        },
    ]
    assert rows("policy_too_broad")[0]["policy"] == "Mechanics can view assignments for realtime"
    assert rows("policy_grants_writes")[0]["policy"] == "writes"
    assert rows("policy_unexpected")[0]["policy"] == "restrictive"
    assert rows("write_privilege_granted") == [
        {"table": "payments", "grantee": "anon", "privilege_type": "INSERT"}
    ]
    assert rows("rls_disabled") == [{"table": "waivers"}]
    assert rows("policy_missing") == [{"table": "intakes", "policy": "intakes_visible"}]
    assert rows("status_not_allowed") == [{"table": "session_assignments", "status": "completed"}]
    assert rows("status_not_in_lifecycle") == [
        {"table": "session_assignments", "status": "declined"}
    ]
    assert {(r["from"], r["to"], r["problem"]) for r in rows("transition_table_differs")} == {
        ("waiting", "live", "missing")
    }
    assert "autodispatch migrate" in finding(report, "migrations_behind").fix
    assert "enable trigger" in finding(report, "trigger_disabled").fix


async def test_a_check_that_fails_is_a_finding_and_the_others_still_run(
    db_url: str, tmp_path: Path
) -> None:
    """One broken piece cannot stop the audit: its check is reported as failed."""
    async with running_world(db_url, tmp_path) as world:
        await world.queued()
    sql(
        db_url,
        "create or replace function public.assignment_visibility_keys(a public.session_assignments)"
        " returns text[] language plpgsql as $$ begin raise exception 'broken on purpose'; end $$",
    )
    report = await audit(db_url)
    failed = finding(report, "check_failed")
    assert failed.rows[0]["check"] == "session visibility keys"
    assert "broken on purpose" in failed.rows[0]["error"]
    assert "gateways" in report.checks and report.facts["event_log"] is not None


FIRST_VERSION = """
create table profiles (id uuid primary key, role text);
create table mechanics (id uuid primary key default gen_random_uuid(), user_id uuid);
create table sessions (id uuid primary key, status text, created_at timestamptz default now());
create table session_assignments (
  id uuid primary key default gen_random_uuid(),
  session_id uuid references sessions (id),
  mechanic_id uuid,
  status text check (status in ('queued','offered','accepted','declined','expired','cancelled'))
    default 'queued',
  offered_at timestamptz,
  metadata jsonb
);
alter table session_assignments enable row level security;
create policy "Mechanics can view assignments for realtime" on session_assignments
  for select to authenticated using (exists (select 1 from mechanics m));
create policy "System can insert assignments" on session_assignments
  for insert to authenticated with check (true);
create table feature_flags (key text primary key, is_enabled boolean);
alter table feature_flags enable row level security;
create policy "Anyone can view enabled feature flags" on feature_flags
  for select using (is_enabled);
insert into sessions (id, status) values
  ('00000000-0000-0000-0000-000000000001', 'completed'),
  ('00000000-0000-0000-0000-000000000002', 'pending'),
  ('00000000-0000-0000-0000-000000000003', 'pending');
insert into session_assignments (session_id, status) values
  ('00000000-0000-0000-0000-000000000001', 'accepted'),
  ('00000000-0000-0000-0000-000000000002', 'declined');
"""


@pytest.fixture
def first_version_db(pg_server: str) -> Any:
    """A database shaped like the first version's (same table names, fewer pieces)."""
    name = f"autodispatch_v1_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    url = database_url(pg_server, name)
    try:
        sql(url, FIRST_VERSION)
        yield url
    finally:
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')


async def test_a_first_version_database_is_audited_without_crashing(first_version_db: str) -> None:
    """What the first version got wrong is named; what it lacks is a finding, not a crash."""
    report = await audit(first_version_db)
    codes = report.codes()
    assert {
        "not_migrated",
        "table_missing",
        "status_not_allowed",
        "status_not_in_lifecycle",
        "status_unconstrained",
        "trigger_missing",
        "rls_disabled",
        "policy_grants_writes",
        "policy_unexpected",
        "policy_missing",
        "ended_session_open_assignment",
        "unknown_status",
        "session_without_assignment",
        "check_not_run",
    } <= codes
    assert "check_failed" not in codes
    ended = finding(report, "ended_session_open_assignment")
    assert [str(r["session_id"]) for r in ended.rows] == ["00000000-0000-0000-0000-000000000001"]
    unknown = finding(report, "unknown_status")
    assert unknown.rows[0]["assignment_status"] == "declined"
    assert "realtime" in {f.area for f in report.findings if f.code == "check_not_run"}


async def test_more_schema_damage_is_named(db_url: str) -> None:
    """A revision newer than the code, a trigger running another function, a trigger on
    the event log (it would run in every writer's commit), a visibility policy that
    stopped comparing keys, and an event log whose head is behind its events."""
    sql(db_url, "update feature_flags set enabled = false where key = 'mech_audio_alerts'")
    sql(
        db_url,
        """
        update alembic_version set version_num = '9999';
        drop trigger sessions_audit on sessions;
        create trigger sessions_audit after insert or update of status on sessions
          for each row execute function public.guard_transition('session', 'pending');
        create trigger events_notify after insert on realtime.events
          for each row execute function public.guard_transition('session', 'pending');
        drop policy sessions_visible on sessions;
        create policy sessions_visible on sessions for select to anon, authenticated
          using (customer_id = auth.uid());
        update realtime.stream set last_id = 0;
        """,
    )
    report = await audit(db_url)
    assert report.codes() == {
        "migrations_ahead",
        "trigger_runs_other_function",
        "event_log_trigger",
        "policy_differs",
        "stream_behind_events",
    }
    assert finding(report, "trigger_runs_other_function").rows == [
        {
            "table": "public.sessions",
            "trigger": "sessions_audit",
            "runs": "public.guard_transition",
            "expected": "public.audit_transition",
        }
    ]
    differs = finding(report, "policy_differs").rows
    assert [(r["policy"], r["problems"]) for r in differs] == [("sessions_visible", ["expression"])]
    assert finding(report, "stream_behind_events").area == "realtime"

    sql(db_url, "delete from realtime.stream")
    assert "stream_row_missing" in (await audit(db_url)).codes()


async def test_every_table_the_api_reads_needs_exactly_its_visibility_policy(
    db_url: str,
) -> None:
    """Each public table the API's roles can read, known or new, needs row-level security
    and its one <table>_visible policy; ours must be exactly the migration's (an `or true`
    tacked on is caught), a new table's must compare one visibility function with the
    caller's keys, and any other policy on it is unexpected."""
    sql(
        db_url,
        """
        create table public.notes (id uuid primary key, owner uuid);
        alter table public.notes enable row level security;
        create policy "members read notes" on public.notes for select to authenticated
          using (auth.uid() is not null);
        create table public.memos (id uuid primary key, owner uuid);
        create function public.memo_visibility_keys(m public.memos) returns text[]
          language sql immutable as $$ select array['user:' || m.owner] $$;
        alter table public.memos enable row level security;
        create policy memos_visible on public.memos for select to anon, authenticated
          using (public.memo_visibility_keys(memos) && (select auth.principal_keys()));
        create table public.drafts (id uuid primary key);
        alter table public.drafts enable row level security;
        create policy drafts_visible on public.drafts for select to anon, authenticated
          using (auth.uid() is not null);
        create table public.scratch (id uuid primary key);
        grant select on public.notes, public.memos, public.drafts, public.scratch
          to authenticated;
        create table public.internal (id uuid primary key);
        alter table public.internal enable row level security;
        create policy internal_anything on public.internal for select to current_user using (true);
        drop policy payments_visible on payments;
        create policy payments_visible on payments for select to anon, authenticated
          using (public.owner_visibility_keys(customer_id) && (select auth.principal_keys())
                 or true);
        drop policy waivers_visible on waivers;
        create policy waivers_visible on waivers as restrictive for select to anon
          using (public.owner_visibility_keys(customer_id) && (select auth.principal_keys()));
        """,
    )
    report = await audit(db_url)
    assert report.codes() == {
        "rls_disabled",
        "policy_unexpected",
        "policy_missing",
        "policy_differs",
        "policy_not_key_based",
    }

    def rows(code: str) -> list[tuple[Any, ...]]:
        return [
            (r["table"], r.get("policy"), r.get("problems")) for r in finding(report, code).rows
        ]

    assert rows("rls_disabled") == [("scratch", None, None)]
    assert rows("policy_unexpected") == [("notes", "members read notes", None)]
    assert rows("policy_missing") == [
        ("notes", "notes_visible", None),
        ("scratch", "scratch_visible", None),
    ]
    assert rows("policy_differs") == [
        ("payments", "payments_visible", ["expression"]),
        ("waivers", "waivers_visible", ["roles anon", "restrictive"]),
    ]
    assert rows("policy_not_key_based") == [("drafts", "drafts_visible", None)]


async def test_a_table_without_a_status_column_is_named(first_version_db: str) -> None:
    """Without sessions.status, the status and pair checks say what is missing."""
    sql(first_version_db, "alter table sessions drop column status")
    report = await audit(first_version_db)
    assert finding(report, "status_column_missing").rows == [{"table": "sessions"}]
    missing = {r["missing"] for f in report.findings if f.code == "check_not_run" for r in f.rows}
    assert "public.sessions.status" in missing
    assert "check_failed" not in report.codes()
