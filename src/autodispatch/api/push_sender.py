"""Web Push to mechanics whose page is closed: the sender that follows the event log.

Every server runs ``PushSender.run``; one at a time sends. A short transaction takes
``realtime.push_cursor``'s row (``FOR UPDATE SKIP LOCKED``), reads the next batch of
events, leases the cursor to this process and commits; the pushes go out with no
transaction open; a second short transaction records each subscription's outcome and
moves the cursor, compare-and-set, only from where the batch began. Another process sees
the lease and waits; a lease that runs out (a dead server) passes to the next sender,
which sends that batch again: delivery is at least once. Each push carries a ``Topic``
(a push service replaces an undelivered push of the same request) and a ``tag`` for the
service worker's notification, so a repeat replaces rather than stacks.

What is pushed: a request when it is first queued (its waiver signed), to every
mechanic who may take it, and an offer, to its mechanic; both only while the request can
still be taken. A request back in the queue after a declined or expired offer alerts
nobody again (the pages do not either). Recipients are the subscriptions of users
holding the keys the event gained (``auth.principal_keys_for``, the function row-level
security uses). What a push carries, and which events make one: ``push_payload``; where
the pushes may go, and how they are POSTed: ``push_network``; the keys that sign them:
``push_keys``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import structlog
from pywebpush import WebPusher  # type: ignore[import-untyped]

from autodispatch.api.push_keys import VapidKeys
from autodispatch.api.push_network import EndpointPolicy, Outcome, PushClient
from autodispatch.api.push_payload import build_payload, newly_takeable
from autodispatch.background import Loops
from autodispatch.db.database import Database, Tx
from autodispatch.metrics import Metrics

log = structlog.get_logger("autodispatch.push")

# RFC 8292 allows a VAPID token up to 24 hours; push services differ, 12 is safe.
VAPID_LIFETIME_SECONDS = 12 * 3600


@dataclass(frozen=True)
class Delivery:
    subscription_id: Any
    endpoint: str
    p256dh: str
    auth: str
    payload: str
    ttl: int
    topic: str  # RFC 8030: a newer push with the same topic replaces an undelivered one


@dataclass(frozen=True)
class Batch:
    """What one run read under the cursor: from where, up to which event, what to send
    (one queue per subscription, in event order)."""

    after: int
    last_id: int
    queues: list[list[Delivery]]


# --- The sender ----------------------------------------------------------------------------


class PushSender:
    def __init__(
        self,
        db: Database,
        metrics: Metrics,
        keys: VapidKeys,
        *,
        request_ttl_seconds: int,
        allowed_hosts: Iterable[str] = (),
        interval: float = 0.5,
        batch_size: int = 50,
        deadline: float = 10.0,
        concurrency: int = 16,
        lease_seconds: float = 60.0,
        max_failures: int = 10,
        ssl_context: ssl.SSLContext | None = None,
        loops: Loops | None = None,
    ) -> None:
        self.db = db
        self.loops = loops if loops is not None else Loops()
        self.metrics = metrics
        self.keys = keys
        self.request_ttl_seconds = request_ttl_seconds
        self.interval = interval
        self.batch_size = batch_size
        self.lease_seconds = lease_seconds
        # A subscription whose pushes failed this many times in a row is deleted.
        self.max_failures = max_failures
        self.policy = EndpointPolicy(allowed_hosts)
        self.client = PushClient(
            self.policy, deadline=deadline, max_connections=concurrency, ssl_context=ssl_context
        )
        self.owner = uuid.uuid4()  # this process's name on the cursor's lease
        self._signer = keys.signer()
        self._sending = asyncio.Semaphore(concurrency)
        self._cursor_missing = False

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the event log until ``stop`` is set, about every ``interval`` seconds
        (at once again after a full batch). A failed run is logged (``push_run_failed``)
        and counted, never fatal: the cursor did not move, so the next run retries the
        same events (a lost connection, a deadlock, a bug)."""
        try:
            await self.loops.run_forever(
                "web-push",
                self._run_counted,
                interval=self.interval,
                stop=stop,
                event="push_run_failed",
            )
        finally:
            await self.client.aclose()

    async def _run_counted(self) -> bool:
        """One run; True when it read a full batch (more may be waiting)."""
        try:
            return await self.run_once() >= self.batch_size
        except Exception:
            self.metrics.push_runs.labels("error").inc()
            raise

    async def run_once(self) -> int:
        """Push for the next batch of events after the cursor and move it past them.

        Three steps, so no transaction (nor pool connection, nor row lock) is held while
        push services answer: a short transaction reads the batch and leases the cursor;
        the pushes go out; a second short transaction records what happened and moves the
        cursor, only if it is still where the batch began and still ours.

        Returns the number of events read (0 when there were none, or when another
        process holds the cursor and is sending).
        """
        batch, read = await self._claim()
        if batch is None:
            return read
        try:
            results = await self._send_all(batch.queues)
        except Exception:
            await self._release()
            raise
        await self._finish(batch, results)
        return read

    # -- step 1: read the batch under the cursor ---------------------------------------------

    async def _claim(self) -> tuple[Batch | None, int]:
        async with self.db.as_service() as tx:
            cursor = await tx.one("lock_push_cursor")
            if cursor is None:
                if await tx.value("push_cursor_exists"):
                    self.metrics.push_runs.labels("busy").inc()
                else:
                    self._report_missing_cursor()
                return None, 0
            if self._cursor_missing:
                self._cursor_missing = False
                log.info("push_cursor_found")
            if cursor["leased"] and cursor["lease_owner"] != self.owner:
                self.metrics.push_runs.labels("busy").inc()  # another process is sending
                return None, 0
            after = int(cursor["last_id"])
            events = await tx.all("push_events_after", {"after": after, "limit": self.batch_size})
            if not events:
                return None, 0
            last_id = int(events[-1]["id"])
            takeable = [(event, keys) for event in events if (keys := newly_takeable(event))]
            queues = await self._plan(tx, takeable) if takeable else []
            if not queues:
                # Nothing to send: move on now, while this transaction holds the row.
                await tx.execute(
                    "advance_push_cursor", {"last_id": last_id, "after": after, "owner": None}
                )
                self.metrics.push_runs.labels("ok").inc()
                return None, len(events)
            await tx.execute(
                "lease_push_cursor", {"owner": self.owner, "seconds": self.lease_seconds}
            )
        return Batch(after, last_id, queues), len(events)

    def _report_missing_cursor(self) -> None:
        """The realtime.push_cursor row is gone (migration 0003 makes it): nobody can send
        until it is back. Counted every run, logged once."""
        self.metrics.push_runs.labels("missing").inc()
        if not self._cursor_missing:
            self._cursor_missing = True
            log.error(
                "push_cursor_missing",
                detail="realtime.push_cursor has no row id = 1: no Web Push is sent until it is"
                " restored (insert into realtime.push_cursor (id, last_id)"
                " select 1, last_id from realtime.stream)",
            )

    async def _plan(
        self, tx: Tx, takeable: Sequence[tuple[Mapping[str, Any], frozenset[str]]]
    ) -> list[list[Delivery]]:
        """Each subscription's pushes for these events, in event order."""
        if not await tx.value("push_alerts_enabled"):
            self.metrics.push_skipped.labels("alerts_off").inc(len(takeable))
            return []
        ids = sorted({str(event["record"]["id"]) for event, _ in takeable})
        open_now = {
            str(row["id"]): row
            for row in await tx.all(
                "open_assignments_now",
                {"ids": ids, "request_ttl_seconds": self.request_ttl_seconds},
            )
        }
        # Who may take each request now: a request taken or cancelled since is not pushed.
        planned: list[tuple[Mapping[str, Any], frozenset[str], datetime | None]] = []
        for event, gained in takeable:
            row = open_now.get(str(event["record"]["id"]))
            keys = gained & frozenset(row["keys"]) if row else frozenset()
            if row is None or not keys:
                self.metrics.push_skipped.labels("no_longer_open").inc()
                continue
            planned.append((event, keys, row["expires_at"]))
        if not planned:
            return []
        wanted = sorted(set().union(*(keys for _, keys, _ in planned)))
        subscriptions = await tx.all("push_subscriptions_for_keys", {"keys": wanted})
        queues: dict[Any, list[Delivery]] = {}
        now = datetime.now(UTC)
        for event, keys, expires_at in planned:
            payload = build_payload(event["id"], event["at"], event["record"], expires_at)
            ttl = (
                max(1, int((expires_at - now).total_seconds()))
                if expires_at
                else self.request_ttl_seconds
            )
            matched = [s for s in subscriptions if keys & frozenset(s["keys"])]
            if not matched:
                self.metrics.push_skipped.labels("no_subscription").inc()
            for s in matched:
                queues.setdefault(s["id"], []).append(
                    Delivery(
                        subscription_id=s["id"],
                        endpoint=s["endpoint"],
                        p256dh=s["p256dh"],
                        auth=s["auth"],
                        payload=payload,
                        ttl=ttl,
                        topic=str(event["record"]["id"]).replace("-", ""),
                    )
                )
        return [queues[key] for key in sorted(queues, key=str)]

    # -- step 2: send, outside any transaction ------------------------------------------------

    async def _send_all(self, queues: Sequence[list[Delivery]]) -> list[list[Outcome]]:
        renewing = asyncio.create_task(self._keep_lease(), name="web-push-lease")
        try:
            return list(await asyncio.gather(*(self._send_in_order(q) for q in queues)))
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing

    async def _keep_lease(self) -> None:
        """Renew the lease while the batch is out, so a slow batch is not sent twice."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                async with self.db.as_service() as tx:
                    kept = await tx.execute(
                        "renew_push_lease", {"owner": self.owner, "seconds": self.lease_seconds}
                    )
            except Exception as exc:
                log.warning("push_lease_renewal_failed", error=f"{type(exc).__name__}: {exc}")
                continue
            if not kept:
                log.warning("push_lease_lost")  # another sender took over: it resends
                return

    async def _send_in_order(self, queue: Sequence[Delivery]) -> list[Outcome]:
        """One subscription's pushes in event order; stop at the first that does not go
        through (a gone or failing endpoint is not tried again in this batch)."""
        outcomes: list[Outcome] = []
        for i, delivery in enumerate(queue):
            outcome = await self._deliver(delivery)
            outcomes.append(outcome)
            if outcome.kind != "sent":
                if len(queue) > i + 1:
                    self.metrics.push_skipped.labels("subscription_failing").inc(len(queue) - i - 1)
                break
        return outcomes

    async def _deliver(self, delivery: Delivery) -> Outcome:
        try:
            headers, body = await asyncio.to_thread(self._encrypt, delivery)
        except Exception as exc:  # bad keys in a subscription must not stop the others
            return Outcome("failed", f"the subscription's keys do not work ({type(exc).__name__})")
        async with self._sending:
            return await self.client.post(delivery.endpoint, headers, body)

    def _encrypt(self, delivery: Delivery) -> tuple[dict[str, str], bytes]:
        """The push's body (RFC 8291, aes128gcm) and headers, VAPID-signed (RFC 8292)."""
        keys = {"p256dh": delivery.p256dh, "auth": delivery.auth}
        pusher = WebPusher({"endpoint": delivery.endpoint, "keys": keys})
        body: bytes = pusher.encode(delivery.payload.encode(), "aes128gcm")["body"]
        parts = urlsplit(delivery.endpoint)
        claims = {
            "sub": self.keys.subject,
            "aud": f"{parts.scheme}://{parts.netloc}",
            "exp": int(time.time()) + VAPID_LIFETIME_SECONDS,
        }
        headers = {
            **self._signer.sign(claims),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "TTL": str(delivery.ttl),
            "Urgency": "high",
            "Topic": delivery.topic,
        }
        return headers, body

    # -- step 3: record and move the cursor ---------------------------------------------------

    async def _finish(self, batch: Batch, results: Sequence[Sequence[Outcome]]) -> None:
        async with self.db.as_service() as tx:
            for queue, outcomes in zip(batch.queues, results, strict=True):
                await self._record(tx, queue[0].subscription_id, outcomes)
            moved = await tx.execute(
                "advance_push_cursor",
                {"last_id": batch.last_id, "after": batch.after, "owner": self.owner},
            )
        if moved:
            self.metrics.push_runs.labels("ok").inc()
        else:
            # Our lease ran out and another sender took the batch: it sends it again
            # (at least once) and moves the cursor; this one must not.
            self.metrics.push_runs.labels("raced").inc()
            log.warning("push_cursor_moved", after=batch.after, last_id=batch.last_id)

    async def _release(self) -> None:
        with contextlib.suppress(Exception):
            async with self.db.as_service() as tx:
                await tx.execute("release_push_lease", {"owner": self.owner})

    async def _record(self, tx: Tx, subscription_id: Any, outcomes: Iterable[Outcome]) -> None:
        for outcome in outcomes:
            self.metrics.push_sends.labels(outcome.kind).inc()
            params = {"subscription_id": subscription_id}
            if outcome.kind == "sent":
                await tx.execute("push_delivered", params)
            elif outcome.kind == "gone":
                await tx.execute("push_gone", params)
                log.info("push_subscription_gone", subscription=str(subscription_id))
            else:
                failures = await tx.value("push_failed", {**params, "error": outcome.error})
                log.warning("push_failed", subscription=str(subscription_id), error=outcome.error)
                if failures is not None and failures >= self.max_failures:
                    await tx.execute("push_gone", params)
                    self.metrics.push_disabled.inc()
                    log.warning(
                        "push_subscription_disabled",
                        subscription=str(subscription_id),
                        failures=failures,
                        error=outcome.error,
                    )
