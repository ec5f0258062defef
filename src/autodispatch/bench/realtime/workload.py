"""The marketplace: accounts, their joins, and requests written through their lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import tempfile
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from autodispatch.bench.realtime.report import Progress
from autodispatch.config import Settings
from autodispatch.db.database import Database
from autodispatch.db.sequencer import Sequencer
from autodispatch.identity.accounts import Accounts
from autodispatch.identity.tokens import TokenIssuer

SECRET = "bench-realtime-secret-" + "r" * 32
TOPIC = "realtime:dispatch"
WORKSHOPS = 20
ADMINS = 5
# Subscribers other than the admins, by share: a prefix of any length keeps the mix.
MIX = (("independent", 0.30), ("workshop", 0.30), ("customer", 0.40))
WORKSHOP_REQUEST_SHARE = 0.4  # the rest are general requests (every mechanic's pool)
WRITER_MARK = "/* bench-writer */"  # inside each writer statement (a leading one is dropped)


@dataclass(frozen=True)
class Member:
    kind: str  # independent, workshop, customer, admin
    user_id: uuid.UUID
    email: str
    mechanic_id: uuid.UUID | None = None
    workshop_id: uuid.UUID | None = None


def _kinds(count: int) -> list[str]:
    """Subscriber kinds in order: admins among the first 100, the rest a smooth mix."""
    kinds: list[str] = []
    given: Counter[str] = Counter()
    admin_slots = {i * 20 for i in range(ADMINS)}
    for i in range(count):
        if i in admin_slots:
            kinds.append("admin")
            continue
        done = len(kinds) - kinds.count("admin")
        kind = max(MIX, key=lambda m: m[1] * (done + 1) - given[m[0]])[0]
        given[kind] += 1
        kinds.append(kind)
    return kinds


async def create_population(url: str, count: int, progress: Progress) -> list[Member]:
    """``count`` accounts of the marketplace mix (cheap password hashes: nobody signs in)."""
    settings = Settings.from_env(
        {}, home=Path(tempfile.gettempdir()), jwt_secret=SECRET, cheap_password_hashing=True
    )
    db = Database(url, min_size=2, max_size=8)
    await db.open()
    kinds = _kinds(count)
    members: list[Member | None] = [None] * count
    gate = asyncio.Semaphore(8)
    try:
        accounts = Accounts(db, settings)

        async def one(i: int) -> None:
            kind = kinds[i]
            email = f"bench-{kind}-{i}@bench.test"
            workshop = f"Bench Workshop {i % WORKSHOPS:02d}" if kind == "workshop" else None
            account_type = {"independent": "mechanic", "workshop": "mechanic"}.get(kind, kind)
            async with gate:
                user = await accounts.create_user(
                    email=email,
                    password="bench-password",
                    account_type=account_type,
                    full_name=f"Bench {kind.title()} {i}",
                    workshop=workshop,
                )
            mechanic = user.get("mechanic") or {}
            members[i] = Member(
                kind, user["id"], email, mechanic.get("id"), mechanic.get("workshop_id")
            )

        # Workshops first, one at a time, so that concurrent accounts do not race to create them.
        firsts: list[int] = []
        seen: set[int] = set()
        for i, kind in enumerate(kinds):
            if kind == "workshop" and i % WORKSHOPS not in seen:
                seen.add(i % WORKSHOPS)
                firsts.append(i)
        for i in firsts:
            await one(i)
        rest = [i for i in range(count) if members[i] is None]
        for start in range(0, len(rest), 500):
            await asyncio.gather(*(one(i) for i in rest[start : start + 500]))
            progress(f"accounts: {min(start + 500, len(rest)) + len(seen)}/{count}")
    finally:
        await db.close()
    return [m for m in members if m is not None]


def join_frames(members: list[Member]) -> list[str]:
    """Each subscriber's ``phx_join``, with its own token and the bindings of its role."""
    tokens = TokenIssuer(SECRET, 12 * 3600)
    frames = []
    for m in members:
        account_type = "mechanic" if m.mechanic_id else m.kind
        token, _ = tokens.access_token(
            user_id=m.user_id, email=m.email, account_type=account_type, name=m.kind
        )
        if m.kind == "admin":
            bindings = [_binding("session_assignments"), _binding("sessions")]
        elif m.kind == "customer":
            mine = f"customer_id=eq.{m.user_id}"
            bindings = [_binding("session_assignments", mine), _binding("sessions", mine)]
        else:
            bindings = [
                _binding("session_assignments"),
                _binding("sessions", f"mechanic_id=eq.{m.mechanic_id}"),
            ]
        config = {
            "broadcast": {"ack": False, "self": False},
            "presence": {"enabled": False, "key": ""},
            "postgres_changes": bindings,
            "private": False,
        }
        frames.append(
            json.dumps(
                {
                    "topic": TOPIC,
                    "event": "phx_join",
                    "payload": {"config": config, "access_token": token},
                    "ref": "1",
                    "join_ref": "1",
                }
            )
        )
    return frames


def _binding(table: str, row_filter: str | None = None) -> dict[str, str]:
    binding = {"event": "*", "schema": "public", "table": table}
    if row_filter:
        binding["filter"] = row_filter
    return binding


# One statement per lifecycle step, as the service; the triggers write the events.
_CREATE = f"""
with {WRITER_MARK} i as (
  insert into public.intakes (customer_id, name, vehicle_year, vehicle_make, vehicle_model, concern)
  values (%(customer)s, 'Bench Driver', 2016, 'Toyota', 'Corolla', 'Grinding noise when braking')
  returning id, customer_id
)
insert into public.sessions (customer_id, intake_id, type, workshop_id)
select customer_id, id, 'free', %(workshop)s from i
returning id"""
_QUEUE = f"""
with {WRITER_MARK} w as (
  insert into public.waivers (session_id, customer_id, signed_name)
  values (%(session)s, %(customer)s, 'Bench Driver')
)
update public.session_assignments set status = 'queued', queued_at = now()
where session_id = %(session)s and status = 'pending_waiver'
returning id"""
_ACCEPT = f"""
update {WRITER_MARK} public.session_assignments
set status = 'accepted', mechanic_id = %(mechanic)s, mechanic_name = 'Bench Mechanic',
    accepted_at = now()
where id = %(assignment)s and status = 'queued'
returning id"""
_START = f"""
update {WRITER_MARK} public.sessions set status = 'live', started_at = now() where id = %(session)s
returning id"""
_END = f"""
update {WRITER_MARK} public.sessions set status = 'completed', ended_at = now()
where id = %(session)s
returning id"""
LIFECYCLE = (
    ("create", _CREATE),
    ("queue", _QUEUE),
    ("accept", _ACCEPT),
    ("start", _START),
    ("end", _END),
)
# Events each step writes (session and assignment rows; see migrations 0001/0002).
EVENTS_PER_STEP = {"create": 2, "queue": 2, "accept": 2, "start": 1, "end": 2}


class Pacer:
    """Hands out events at a rate that can change (0: paused), without bursts."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.rate = 0.0
        self.next = 0.0
        self.generation = 0
        self.changed = asyncio.Event()

    def set_rate(self, rate: float) -> None:
        self.rate = rate
        self.next = self.loop.time()
        self.generation += 1
        self.changed.set()

    async def take(self, events: int) -> None:
        while True:
            if self.rate <= 0:
                self.changed.clear()
                await self.changed.wait()
                continue
            generation = self.generation
            now = self.loop.time()
            at = max(self.next, now - 0.05)
            self.next = at + events / self.rate
            if at > now:
                await asyncio.sleep(at - now)
            if generation == self.generation:
                return
            # The rate changed while we waited (a pause, a new step): take a fresh turn.


class Writer:
    """Requests through their lifecycle, written straight into the database at a rate.

    One task per connection, each taking requests through their whole lifecycle; a task
    keeps its place across pauses, so every measured window sees the steady mix of
    lifecycle steps (not a burst of fresh requests)."""

    def __init__(self, url: str, members: list[Member], connections: int) -> None:
        self.url = url
        self.members = members
        self.connections = connections
        self.rng = random.Random(7)
        self.workshops = sorted({m.workshop_id for m in members if m.workshop_id})
        self.written = 0  # events
        self.errors: list[BaseException] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._conns: list[psycopg.AsyncConnection[Any]] = []
        self._pacer: Pacer | None = None
        # Numbers the events these writes make as soon as each commits, as a server does
        # for its own writes (db/sequencer.py); the server's timer is for other writers.
        self.sequencer = Sequencer(url, spacing=Settings.realtime_sequence_spacing)
        self._sequencing: asyncio.Task[None] | None = None
        self._stop_sequencing = asyncio.Event()
        self._pools: dict[tuple[tuple[str, ...], uuid.UUID | None], list[Member]] = {}
        self.watching = len(members)

    @property
    def watching(self) -> int:
        return self._watching

    @watching.setter
    def watching(self, count: int) -> None:
        """Subscribers 0..count-1 are connected: requests are theirs when possible."""
        self._watching = count
        self._pools.clear()

    async def start(self) -> None:
        self._pacer = Pacer()
        self._conns = [
            await psycopg.AsyncConnection.connect(self.url, autocommit=True)
            for _ in range(self.connections)
        ]
        self._tasks = [asyncio.create_task(self._lifecycles(conn)) for conn in self._conns]
        self._stop_sequencing.clear()
        self._sequencing = asyncio.create_task(self.sequencer.run(self._stop_sequencing))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sequencing is not None:
            self._stop_sequencing.set()
            self.sequencer.poke()
            await self._sequencing
            self._sequencing = None
        for conn in self._conns:
            with contextlib.suppress(psycopg.Error):
                await conn.close()
        self._tasks, self._conns = [], []

    def set_rate(self, rate: float) -> None:
        if self.errors:
            raise SystemExit(f"the bench writer failed: {self.errors[0]!r}")
        assert self._pacer is not None
        self._pacer.set_rate(rate)

    async def run(self, rate: float, seconds: float) -> None:
        """Write at ``rate`` events per second for ``seconds``, then pause."""
        self.set_rate(rate)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.set_rate(0)

    def _pick(self, kinds: tuple[str, ...], workshop: uuid.UUID | None = None) -> Member:
        """A member of these kinds, among the connected subscribers when there is one."""
        pool = self._pools.get((kinds, workshop))
        if pool is None:
            for candidates in (self.members[: self.watching], self.members):
                pool = [
                    m
                    for m in candidates
                    if m.kind in kinds and (workshop is None or m.workshop_id == workshop)
                ]
                if pool:
                    break
            if not pool:
                raise SystemExit(f"the bench population has no {kinds} member")
            self._pools[(kinds, workshop)] = pool
        return self.rng.choice(pool)

    async def _lifecycles(self, conn: psycopg.AsyncConnection[Any]) -> None:
        assert self._pacer is not None
        try:
            while True:
                customer = self._pick(("customer",))
                workshop = None
                if self.workshops and self.rng.random() < WORKSHOP_REQUEST_SHARE:
                    workshop = self.rng.choice(self.workshops)
                kinds = ("workshop",) if workshop else ("independent", "workshop")
                ids: dict[str, Any] = {
                    "customer": customer.user_id,
                    "workshop": workshop,
                    "mechanic": self._pick(kinds, workshop).mechanic_id,
                }
                for step, sql in LIFECYCLE:
                    await self._pacer.take(EVENTS_PER_STEP[step])
                    cur = await conn.execute(sql, ids)
                    self.sequencer.poke()
                    row = await cur.fetchone()
                    if row is None:
                        raise RuntimeError(f"bench writer: step {step} changed nothing ({ids})")
                    self.written += EVENTS_PER_STEP[step]
                    if step == "create":
                        ids["session"] = row[0]
                    elif step == "queue":
                        ids["assignment"] = row[0]
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # reported by the next set_rate, not lost in a task
            self.errors.append(exc)
