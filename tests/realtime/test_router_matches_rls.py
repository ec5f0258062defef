"""What the real router delivers equals row-level security, binding by binding (issue 14).

A hypothesis state machine runs the app with its real ``Hub`` (the reader reads the real
event log, the router routes it) and one subscription per principal: two customers, two
independent mechanics, a mechanic of each of two workshops, an admin and an anonymous
visitor. Each subscription holds several bindings drawn from ``rls_expectation.POOL`` in
a random order: every subscribed table, every event type, filters on the columns that
move. The machine makes random moves through the API (request, waiver, offer, decline,
accept, start, end, cancel, chat, probe ping, feature flag), deletes rows by SQL (a
session purged with its assignment and chat; probe pings aged so that the next ping drops
them), and changes principals by SQL (a mechanic moved to another workshop or to none, an
account type changed, an account disabled or enabled), alone or in a burst with other
moves that the reader then reads in one go.

After each move, once the reader has routed everything and no subscription is
re-keying, every binding must have received exactly what RLS says, read by SELECT under
each principal's claims before and after each transaction (``rls_expectation``): for a
row event, the new version iff RLS shows it now, else a DELETE of the old one iff RLS
showed it before, with the binding's filter and event type applied as realtime-js applies
them; for a change of a principal, one DELETE per row that left its view, on each binding
whose filter held for the row and that wants DELETE; nothing else.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import psycopg
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
)
from rls_expectation import (
    POOL,
    TABLES,
    LogRow,
    Phase,
    RecordingSink,
    Spec,
    View,
    expected_removals,
    expected_row_frames,
    received,
    split_by_phase,
    visible_rows,
)

from autodispatch.app import create_app
from autodispatch.domain.principal import ANONYMOUS, Principal
from autodispatch.realtime.hub import Hub
from autodispatch.realtime.protocol import parse_filter
from autodispatch.realtime.router import Binding, Subscription
from conftest import Account, World, make_settings

ANON = "anonymous"
FLAG = "mech_audio_alerts"
CUSTOMERS = ["customer", "other_customer"]
MECHANICS = ["mechanic", "other_mechanic", "workshop_mechanic", "rival_workshop_mechanic"]
USERS = sorted([*CUSTOMERS, *MECHANICS, "admin"])
# A subscription's bindings: a random order of a random part of the pool (at least six).
LAYOUT = st.tuples(st.permutations(range(len(POOL))), st.integers(6, len(POOL)))
# Changes of what a user may see: (what, whose, to what). Workshops: 0 none, 1 and 2.
CHANGES = st.one_of(
    st.tuples(st.just("workshop"), st.sampled_from(MECHANICS), st.sampled_from([0, 1, 2])),
    st.tuples(
        st.just("account_type"),
        st.sampled_from(USERS),
        st.sampled_from(["customer", "mechanic", "admin"]),
    ),
    st.tuples(st.just("disabled"), st.sampled_from(USERS), st.booleans()),
)
# Steps of a burst: changes of principals between row moves, committed back to back.
STEPS = st.one_of(
    CHANGES,
    st.tuples(st.just("advance"), st.integers(0, 3), st.none()),
    st.tuples(st.just("ping"), st.sampled_from(USERS), st.sampled_from(["alpha", "zulu"])),
)
SessionRef = tuple[str, str, int]  # session id, assignment id, index of its customer
Frames = list[tuple[tuple[int, ...], dict[str, Any]]]


def test_router_deliveries_equal_rls_for_every_binding(db_url: str, tmp_path: Path) -> None:
    """Every binding of every principal gets exactly the frames RLS implies, through row
    moves, row deletions and changes of what each principal may see."""
    loop = asyncio.new_event_loop()
    app = create_app(make_settings(tmp_path, expiry_interval_seconds=3600), db_url)
    lifespan = app.router.lifespan_context(app)
    loop.run_until_complete(lifespan.__aenter__())
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    world = World(app, client, *([None] * 9))  # type: ignore[arg-type]
    hub: Hub = app.state.realtime
    conn = psycopg.connect(db_url, autocommit=True)

    def run(coro: Any) -> Any:
        return loop.run_until_complete(coro)

    run(world.populate())
    users: dict[str, Account] = {name: getattr(world, name) for name in USERS}
    names = [*USERS, ANON]
    workshops = [None, world.workshop_id, world.rival_workshop_id]
    floor = hub.reader.position  # events up to here were never this hub's to route

    def head() -> int:
        # Everything committed, numbered: the server numbers an API call's events just
        # after its commit, which may be after the response.
        conn.execute("select realtime.sequence(100000)")
        row = conn.execute("select last_id from realtime.stream where id = 1").fetchone()
        assert row is not None
        return int(row[0])

    def sql(statement: str, *params: Any) -> None:
        conn.execute(statement, params)

    def settle(subs: list[Subscription]) -> None:
        """Wait until the reader has routed the whole log and no subscription is still
        applying a change of its keys."""
        target = head()

        async def wait() -> None:
            deadline = loop.time() + 20
            while not (
                (target <= floor or hub.reader.routed >= target)
                and not any(sub.buffering for sub in subs)
            ):
                assert loop.time() < deadline, (target, hub.reader.routed)
                await asyncio.sleep(0.005)

        run(wait())

    def views() -> dict[str, View]:
        return {
            name: visible_rows(conn, users[name].id if name in users else None) for name in names
        }

    def reset_world() -> None:
        """Each example starts from the same state, whatever the previous one left: every
        account as populate() made it, no sessions, no probe pings, the flag on, and no
        events kept (the hub takes rows' versions from the log: an example must not
        depend on another's history). Nobody is subscribed meanwhile."""
        sql("delete from public.sessions")
        sql("delete from public.probe_pings")
        sql("update public.feature_flags set enabled = true where key = %s", FLAG)
        sql("update auth.users set disabled_at = null where disabled_at is not null")
        for account in users.values():
            sql(
                "update public.profiles set account_type = %s where id = %s and account_type <> %s",
                account.account_type,
                account.id,
                account.account_type,
            )
            if account.mechanic_id is not None:
                sql(
                    "update public.mechanics set workshop_id = %s"
                    " where id = %s and workshop_id is distinct from %s",
                    account.workshop_id,
                    account.mechanic_id,
                    account.workshop_id,
                )
        settle([])  # routed before pruned: the reader must not meet a hole
        sql("update realtime.events set at = now() - interval '30 days' where id is not null")
        sql("select realtime.prune(interval '7 days')")

    class RouterEqualsRls(RuleBasedStateMachine):
        sessions = Bundle("sessions")

        def __init__(self) -> None:
            super().__init__()
            self.subs: dict[str, Subscription] = {}
            self.sinks: dict[str, RecordingSink] = {}
            self.bindings: dict[str, list[tuple[int, Spec]]] = {}
            self.before: dict[str, View] = {}
            self.position = 0
            self.phases: list[Phase] = []
            self.move = "subscribe"

        # --- setup ---------------------------------------------------------------------------

        @initialize(
            target=sessions, layouts=st.lists(LAYOUT, min_size=len(names), max_size=len(names))
        )
        def subscribe(self, layouts: list[tuple[tuple[int, ...], int]]) -> Any:
            reset_world()
            # Requests to start from: two queued (one general, one of a workshop), one
            # accepted by a workshop mechanic, one live; the last two with a chat.
            seeds = [self.request(0, 0), self.request(0, 1), self.request(1, 2), self.request(1, 0)]
            for s in seeds:
                self.waiver(s)
            self.accept(seeds[2], "rival_workshop_mechanic")
            self.accept(seeds[3], "mechanic")
            self.start(seeds[3], "customer")
            for s in seeds[2:]:
                self.chat(s, "customer")
                self.chat(s, "assignee")
            settle([])
            for name, (order, count) in zip(names, layouts, strict=True):
                bindings = [(i, POOL[k]) for i, k in enumerate(order[:count], start=1)]
                principal = ANONYMOUS
                if name in users:
                    principal = Principal(user_id=users[name].id, role="authenticated")
                sink = RecordingSink()
                sub = run(
                    hub.subscribe(
                        principal,
                        tuple(
                            Binding(
                                id=i,
                                table=spec.table,
                                event=spec.event,
                                filter=parse_filter(spec.filter) if spec.filter else None,
                            )
                            for i, spec in bindings
                        ),
                        sink,
                        "test",
                    )
                )
                self.subs[name], self.sinks[name], self.bindings[name] = sub, sink, bindings
            settle(list(self.subs.values()))
            self.position, self.before = head(), views()
            return multiple(*seeds)

        def teardown(self) -> None:
            for sub in self.subs.values():
                hub.unsubscribe(sub)

        def mark(self) -> None:
            """Close a phase: the events since the last one, and the views after them."""
            last = head()
            events = [
                LogRow(*row)
                for row in conn.execute(
                    "select id, schema_name, table_name, type, row_id from realtime.events"
                    " where id > %s and id <= %s order by id",
                    (self.position, last),
                ).fetchall()
            ]
            rows = [e for e in events if e.schema == "public" and e.table in TABLES]
            changes = [e for e in events if (e.schema, e.table) == ("auth", "principals")]
            assert len(rows) + len(changes) == len(events), events
            assert not (rows and changes), f"{self.move}: rows and principals in one phase"
            assert len(changes) <= 1, f"{self.move}: {changes}"
            written = [(e.table, e.row_id) for e in rows]
            # One version per row and phase: RLS before and after is then that version's.
            assert len(written) == len(set(written)), f"{self.move} wrote a row twice: {rows}"
            after = views()
            if not changes:
                # Every row a principal sees appear, change or go has an event: else no
                # binding could be told (capture skipping a type would pass unseen here).
                for name in names:
                    moved = {
                        key
                        for key in after[name].keys() | self.before[name].keys()
                        if after[name].get(key) != self.before[name].get(key)
                    }
                    assert moved <= set(written), (
                        f"after {self.move!r}, RLS shows {name} rows changed that no event"
                        f" reports: {sorted(moved - set(written))}"
                    )
            self.phases.append(
                Phase(
                    move=self.move,
                    after_id=self.position,
                    last=last,
                    rows=rows,
                    changed=changes[0].row_id if changes else None,
                    change_id=changes[0].id if changes else None,
                    before=self.before,
                    views=after,
                )
            )
            self.position, self.before = last, after

        # --- moves through the API -----------------------------------------------------------

        def call(self, method: str, url: str, who: str, body: Any = None) -> httpx.Response:
            self.move = f"{who}: {method} {url} {body or ''}"
            r: httpx.Response = run(
                client.request(method, url, json=body, headers=users[who].headers)
            )
            assert r.status_code < 500, r.text
            return r

        @rule(
            target=sessions, customer=st.sampled_from([0, 1]), workshop=st.sampled_from([0, 1, 2])
        )
        def request(self, customer: int, workshop: int) -> Any:
            body: dict[str, Any] = {
                "type": "free",
                "intake": {
                    "name": "Pat Q",
                    "vehicle_year": 2012,
                    "vehicle_make": "Ford",
                    "vehicle_model": "Focus",
                    "concern": "Noise",
                },
            }
            if workshops[workshop]:
                body["workshop_id"] = str(workshops[workshop])
            r = self.call("POST", "/api/sessions", CUSTOMERS[customer], body)
            if r.status_code != 201:  # no longer a customer
                return multiple()
            return r.json()["session"]["id"], r.json()["assignment"]["id"], customer

        @rule(s=sessions)
        def waiver(self, s: SessionRef) -> None:
            self.call("POST", f"/api/sessions/{s[0]}/waiver", CUSTOMERS[s[2]])

        @rule(s=sessions, m=st.sampled_from(MECHANICS))
        def accept(self, s: SessionRef, m: str) -> None:
            self.call("POST", f"/api/assignments/{s[1]}/accept", m)

        @rule(s=sessions, m=st.sampled_from(MECHANICS))
        def offer(self, s: SessionRef, m: str) -> None:
            body = {"mechanic_id": str(users[m].mechanic_id), "ttl_seconds": 86400}
            self.call("POST", f"/api/assignments/{s[1]}/offer", "admin", body)

        @rule(s=sessions, m=st.sampled_from(MECHANICS))
        def decline(self, s: SessionRef, m: str) -> None:
            self.call("POST", f"/api/assignments/{s[1]}/decline", m)

        def actor(self, s: SessionRef, by: str) -> str:
            """The session's customer, its accepted mechanic (else the customer), a mechanic
            who is neither, or the admin."""
            if by == "assignee":
                row = conn.execute(
                    "select mechanic_id from public.sessions where id = %s", (s[0],)
                ).fetchone()
                for name in MECHANICS:
                    if row is not None and users[name].mechanic_id == row[0]:
                        return name
                return CUSTOMERS[s[2]]
            return {"customer": CUSTOMERS[s[2]], "stranger": "other_mechanic"}.get(by, by)

        @rule(s=sessions, by=st.sampled_from(["customer", "assignee", "stranger"]))
        def start(self, s: SessionRef, by: str) -> None:
            self.call("POST", f"/api/sessions/{s[0]}/start", self.actor(s, by))

        @rule(
            s=sessions,
            action=st.sampled_from(["end", "cancel"]),
            by=st.sampled_from(["customer", "assignee", "admin"]),
        )
        def finish(self, s: SessionRef, action: str, by: str) -> None:
            self.call("POST", f"/api/sessions/{s[0]}/{action}", self.actor(s, by))

        @rule(s=sessions, by=st.sampled_from(["customer", "assignee", "stranger"]))
        def chat(self, s: SessionRef, by: str) -> None:
            body = {"body": "on my way"}
            self.call("POST", f"/api/sessions/{s[0]}/messages", self.actor(s, by), body)

        @rule(s=sessions, pick=st.integers(0, 3))
        def advance(self, s: SessionRef, pick: int) -> None:
            """The session's next step, by someone who may take it (the random moves above
            mostly fail): waiver, accept or decline, chat, start, end; an ended session is
            purged."""
            row = conn.execute(
                "select a.status, a.workshop_id, a.offered_to, s.status from public.sessions s"
                " join public.session_assignments a on a.session_id = s.id where s.id = %s",
                (s[0],),
            ).fetchone()
            if row is None:
                self.move = "advance a purged session"
                return
            status, workshop, offered_to, session_status = row
            if status == "pending_waiver":
                self.waiver(s)
            elif status == "queued":
                workshop_of: dict[Any, Any] = dict(
                    conn.execute("select id, workshop_id from public.mechanics").fetchall()
                )
                eligible = [
                    m for m in MECHANICS if workshop in (None, workshop_of[users[m].mechanic_id])
                ] or MECHANICS
                self.accept(s, eligible[pick % len(eligible)])
            elif status == "offered":
                (m,) = [m for m in MECHANICS if users[m].mechanic_id == offered_to]
                (self.accept if pick % 2 else self.decline)(s, m)
            elif session_status in ("waiting", "live") and pick < 2:
                self.chat(s, "assignee" if pick else "customer")
            elif session_status == "waiting":
                self.start(s, "assignee" if pick == 2 else "customer")
            elif session_status == "live":
                self.finish(s, "end", "assignee")
            else:
                self.purge(s)

        @rule(who=st.sampled_from(USERS), nonce=st.sampled_from(["alpha", "zulu"]))
        def ping(self, who: str, nonce: str) -> None:
            self.call("POST", "/api/probe/ping", who, {"nonce": nonce})

        @rule(enabled=st.booleans())
        def flag(self, enabled: bool) -> None:
            self.call("PATCH", f"/api/feature-flags/{FLAG}", "admin", {"enabled": enabled})

        # --- row changes by SQL: UPDATEs and DELETEs the API does not make on its own ---------

        @rule(who=st.sampled_from(USERS))
        def age_pings(self, who: str) -> None:
            """Make a user's pings a day old: their next ping deletes them."""
            self.move = f"age {who}'s pings"
            sql(
                "update public.probe_pings set created_at = created_at - interval '2 days'"
                " where user_id = %s and created_at > now() - interval '1 day'",
                users[who].id,
            )

        @rule(s=sessions)
        def purge(self, s: SessionRef) -> None:
            """Delete a session, and with it its assignment and chat (on delete cascade)."""
            self.move = f"purge session {s[0]}"
            sql("delete from public.sessions where id = %s", s[0])

        # --- changes of what a principal may see, by SQL ----------------------------------------

        def change(self, what: str, who: str, value: Any) -> None:
            self.move = f"set {who}'s {what} to {value}"
            if what == "workshop":
                sql(
                    "update public.mechanics set workshop_id = %s where id = %s",
                    workshops[value],
                    users[who].mechanic_id,
                )
            elif what == "account_type":
                sql(
                    "update public.profiles set account_type = %s where id = %s",
                    value,
                    users[who].id,
                )
            else:
                sql(
                    "update auth.users set disabled_at = case when %s then now() end where id = %s",
                    value,
                    users[who].id,
                )

        @rule(m=st.sampled_from(MECHANICS), workshop=st.sampled_from([0, 1, 2]))
        def move_mechanic(self, m: str, workshop: int) -> None:
            self.change("workshop", m, workshop)

        @rule(who=st.sampled_from(USERS), kind=st.sampled_from(["customer", "mechanic", "admin"]))
        def retype(self, who: str, kind: str) -> None:
            self.change("account_type", who, kind)

        @rule(who=st.sampled_from(USERS), disabled=st.booleans())
        def disable(self, who: str, disabled: bool) -> None:
            self.change("disabled", who, disabled)

        @rule(s=sessions, steps=st.lists(STEPS, min_size=2, max_size=4))
        def burst(self, s: SessionRef, steps: list[tuple[str, Any, Any]]) -> None:
            """Several transactions back to back, each its own phase: the reader may read
            the changes of principals among the row events in one go."""
            for i, (what, a, b) in enumerate(steps):
                if i:
                    self.mark()
                if what == "advance":
                    self.advance(s, a)
                elif what == "ping":
                    self.ping(a, b)
                else:
                    self.change(what, a, b)

        # --- the check -----------------------------------------------------------------------

        @invariant()
        def deliveries_equal_rls(self) -> None:
            if not self.subs:
                return
            self.mark()
            settle(list(self.subs.values()))
            phases, self.phases = self.phases, []
            for name in names:
                sink = self.sinks[name]
                assert sink.closed == [], f"{name}'s subscription was closed: {sink.closed}"
                user_id = str(users[name].id) if name in users else None
                for phase, frames in zip(
                    phases, split_by_phase(sink.take(), phases, name, user_id), strict=True
                ):
                    self.check(name, phase, frames, user_id)

        def check(self, name: str, phase: Phase, frames: Frames, user_id: str | None) -> None:
            bindings = self.bindings[name]
            got = received([i for i, _ in bindings], frames)
            if user_id is not None and phase.changed == user_id:
                cursors = [data.get("event_id") for _, data in frames]
                assert set(cursors) <= {None, phase.change_id}, cursors
                # Only the frames of the change's last removal carry its id, and come last.
                marked = [i for i, c in enumerate(cursors) if c is not None]
                assert marked == list(range(len(frames) - len(marked), len(frames))), cursors
                assert len({str(frames[i][1]["old_record"]) for i in marked}) <= 1, frames
                got = {i: sorted(s._replace(event_id=None) for s in v) for i, v in got.items()}
                want = expected_removals(bindings, phase.before[name], phase.views[name])
            else:
                want = expected_row_frames(
                    bindings, phase.rows, phase.before[name], phase.views[name]
                )
            for i, spec in bindings:
                assert got.get(i) == want[i], (
                    f"after {phase.move!r}: {name}'s binding {i} ({spec})"
                    f" got {got.get(i)}, RLS says {want[i]}"
                )
            assert set(got) == {i for i, _ in bindings}, f"{name}: frames for unknown ids"

    RouterEqualsRls.TestCase.settings = settings(
        max_examples=40,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    try:
        RouterEqualsRls.TestCase().runTest()
    finally:
        conn.close()
        run(client.aclose())
        run(lifespan.__aexit__(None, None, None))
        loop.close()
