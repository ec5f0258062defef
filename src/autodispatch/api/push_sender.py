"""Web Push to mechanics whose page is closed: the VAPID keys, and the sender that follows
the event log.

Every server runs ``PushSender.run``; only the one holding ``realtime.push_cursor``'s row
lock (``FOR UPDATE SKIP LOCKED``) sends, so several servers never send a push twice, and
a restart carries on from the cursor. For each ``session_assignments`` event whose new
version became takeable by mechanics who could not take the old one (it gained
``pool:general``, ``pool:workshop:<id>`` or ``mechanic:<id>``), and that can still be
taken now, the sender pushes the request's summary to every subscription of a mechanic
holding one of those keys (``auth.principal_keys_for``, the function row-level security
uses). pywebpush is synchronous: each push runs in this sender's own threads.

Delivery is at least once: a server that dies mid-batch leaves the cursor where it was,
and the next sender pushes that batch again. Each push carries a ``Topic`` (a push
service replaces an undelivered push of the same request) and a ``tag`` for the service
worker's notification, so a repeat replaces rather than stacks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid02  # type: ignore[import-untyped]
from pywebpush import WebPushException, webpush  # type: ignore[import-untyped]

from autodispatch.config import Settings
from autodispatch.db.database import Database, Tx
from autodispatch.metrics import Metrics

log = structlog.get_logger("autodispatch.push")

KEY_FILE = "vapid_private_key.pem"
# Keys that let a mechanic take a request (assignment_visibility_keys in migration 0001).
TAKEABLE_PREFIXES = ("pool:", "mechanic:")
TAKEABLE_STATUSES = ("queued", "offered")
# The JSON we send must fit one aes128gcm record (4096 bytes with 103 of overhead);
# stay well inside it. A long concern is shortened to fit.
PAYLOAD_BUDGET = 3000
NOTIFICATION_BODY_CHARS = 140


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- VAPID keys ---------------------------------------------------------------------------


def parse_private_key(text: str) -> ec.EllipticCurvePrivateKey:
    """A P-256 private key from PEM, or from base64url (the raw 32-byte scalar, as
    `web-push generate-vapid-keys` prints it, or DER)."""
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_private_key(text.encode(), password=None)
        else:
            raw = b64url_decode(text.replace("\n", ""))
            if len(raw) == 32:
                key = ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
            else:
                key = serialization.load_der_private_key(raw, password=None)
    except ValueError as exc:
        raise SystemExit(f"the VAPID private key cannot be read: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise SystemExit("the VAPID private key must be a P-256 (prime256v1) EC key")
    return key


def _key_in_home(home: Path) -> ec.EllipticCurvePrivateKey:
    """The key kept in the home folder, made on first start (as the JWT secret is)."""
    path = home / KEY_FILE
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        try:
            # Link, not rename: if another process made one first, keep theirs.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return parse_private_key(path.read_text())


@dataclass(frozen=True)
class VapidKeys:
    private_key: ec.EllipticCurvePrivateKey
    subject: str  # mailto: or https: contact, the JWT's `sub`

    @classmethod
    def load(cls, settings: Settings) -> VapidKeys:
        """The configured key (AUTODISPATCH_VAPID_PRIVATE_KEY), else the home folder's."""
        if not settings.vapid_subject.startswith(("mailto:", "https://")):
            raise SystemExit(
                "AUTODISPATCH_VAPID_SUBJECT must be a mailto: or https: URL push services can"
                f" reach you at, not {settings.vapid_subject!r}"
            )
        if settings.vapid_private_key:
            key = parse_private_key(settings.vapid_private_key)
        else:
            key = _key_in_home(settings.home)
        return cls(key, settings.vapid_subject)

    @property
    def public_key(self) -> str:
        """base64url of the uncompressed point: the browser's `applicationServerKey`."""
        return b64url(
            self.private_key.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
        )

    def signer(self) -> Any:
        return Vapid02(self.private_key)


# --- What to push ------------------------------------------------------------------------


def newly_takeable(event: Mapping[str, Any]) -> frozenset[str]:
    """The keys of mechanics who may take this event's new version and could not take the
    old one (empty when the event does not offer anyone a request)."""
    if event["table_name"] != "session_assignments" or event["type"] == "DELETE":
        return frozenset()
    if (event["record"] or {}).get("status") not in TAKEABLE_STATUSES:
        return frozenset()
    gained = set(event["new_keys"] or ()) - set(event["old_keys"] or ())
    return frozenset(key for key in gained if key.startswith(TAKEABLE_PREFIXES))


def _dumps(payload: Mapping[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), default=str)


def _clip(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 1].rstrip() + "…"


def build_payload(
    event_id: int, committed_at: datetime, record: Mapping[str, Any], expires_at: datetime | None
) -> str:
    """The push's JSON: all a service worker needs to show the request, no fetch."""
    summary = dict(record.get("request_summary") or {})
    concern = str(summary.get("concern") or "")
    first_name = summary.get("customer_first_name") or "A customer"
    payload: dict[str, Any] = {
        "type": "new_request",
        "event_id": event_id,
        "assignment_id": record["id"],
        "session_id": record.get("session_id"),
        "status": record.get("status"),
        "request_summary": summary,
        "title": f"New request: {summary.get('vehicle') or 'a vehicle'}",
        "body": _clip(f"{first_name}: {concern}", NOTIFICATION_BODY_CHARS),
        "tag": f"request-{record['id']}",
        "url": "/mechanic",
        "committed_at": committed_at.isoformat(),
        "expires_at": expires_at.isoformat() if expires_at else None,
    }
    text = _dumps(payload)
    while len(text.encode()) > PAYLOAD_BUDGET and concern:
        # Cut the concern's UTF-8 by the excess (and the ellipsis), never inside a character.
        keep = len(concern.encode()) - (len(text.encode()) - PAYLOAD_BUDGET) - len("…".encode())
        concern = concern.encode()[: max(0, keep)].decode(errors="ignore").rstrip()
        summary["concern"] = concern + "…"
        text = _dumps(payload)
    return text


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
class Outcome:
    kind: str  # "sent", "failed" or "gone"
    error: str | None = None


# --- The sender ----------------------------------------------------------------------------


class PushSender:
    def __init__(
        self,
        db: Database,
        metrics: Metrics,
        keys: VapidKeys,
        *,
        request_ttl_seconds: int,
        interval: float = 0.5,
        batch_size: int = 50,
        timeout: float = 5.0,
        threads: int = 4,
    ) -> None:
        self.db = db
        self.metrics = metrics
        self.keys = keys
        self.request_ttl_seconds = request_ttl_seconds
        self.interval = interval
        self.batch_size = batch_size
        self.timeout = timeout
        self.threads = threads
        self._signer = keys.signer()
        self._executor: ThreadPoolExecutor | None = None
        self._local = threading.local()

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the event log until ``stop`` is set, about every ``interval`` seconds."""
        self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="web-push")
        try:
            while not stop.is_set():
                full = False
                try:
                    full = await self.run_once() >= self.batch_size
                except Exception as exc:
                    # Counted and logged, never fatal: the cursor did not move, so the next
                    # run retries the same events (a lost connection, a deadlock, a bug).
                    self.metrics.push_runs.labels("error").inc()
                    log.warning("push_run_failed", error=f"{type(exc).__name__}: {exc}")
                if not full:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=self.interval)
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def run_once(self) -> int:
        """Push for the next batch of events after the cursor and move it past them.

        Returns the number of events read (0 when there were none, or when another
        process holds the cursor and is sending).
        """
        async with self.db.as_service() as tx:
            after = await tx.value("lock_push_cursor")
            if after is None:
                self.metrics.push_runs.labels("busy").inc()
                return 0
            events = await tx.all("push_events_after", {"after": after, "limit": self.batch_size})
            if not events:
                return 0
            takeable = [(event, keys) for event in events if (keys := newly_takeable(event))]
            if takeable:
                await self._push(tx, takeable)
            await tx.execute("advance_push_cursor", {"last_id": events[-1]["id"]})
        self.metrics.push_runs.labels("ok").inc()
        return len(events)

    async def _push(
        self, tx: Tx, takeable: Sequence[tuple[Mapping[str, Any], frozenset[str]]]
    ) -> None:
        if not await tx.value("push_alerts_enabled"):
            self.metrics.push_skipped.labels("alerts_off").inc(len(takeable))
            return
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
            return
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
        results = await asyncio.gather(*(self._send_in_order(q) for q in queues.values()))
        for queue, outcomes in zip(queues.values(), results, strict=True):
            await self._record(tx, queue[0].subscription_id, outcomes)

    async def _send_in_order(self, queue: Iterable[Delivery]) -> list[Outcome]:
        """One subscription's pushes in event order; stop at the first that does not go
        through (a gone or failing endpoint is not tried again in this batch)."""
        loop = asyncio.get_running_loop()
        outcomes: list[Outcome] = []
        pending = list(queue)
        for i, delivery in enumerate(pending):
            outcome = await loop.run_in_executor(self._executor, self._post, delivery)
            outcomes.append(outcome)
            if outcome.kind != "sent":
                if len(pending) > i + 1:
                    self.metrics.push_skipped.labels("subscription_failing").inc(
                        len(pending) - i - 1
                    )
                break
        return outcomes

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
                await tx.execute("push_failed", {**params, "error": outcome.error})
                log.warning("push_failed", subscription=str(subscription_id), error=outcome.error)

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _post(self, delivery: Delivery) -> Outcome:
        """Encrypt, sign and POST one push (in a worker thread)."""
        try:
            webpush(
                subscription_info={
                    "endpoint": delivery.endpoint,
                    "keys": {"p256dh": delivery.p256dh, "auth": delivery.auth},
                },
                data=delivery.payload,
                vapid_private_key=self._signer,
                vapid_claims={"sub": self.keys.subject},  # a fresh dict: webpush adds aud, exp
                ttl=delivery.ttl,
                timeout=self.timeout,
                headers={"Urgency": "high", "Topic": delivery.topic},
                requests_session=self._session(),
            )
        except WebPushException as exc:
            status = exc.status_code
            if status in (404, 410):
                return Outcome("gone", f"HTTP {status}")
            text = getattr(exc.response, "text", "") or ""
            detail = f"HTTP {status}: {text.strip()}" if status else str(exc.message)
            return Outcome("failed", detail[:500])
        except requests.RequestException as exc:
            return Outcome("failed", f"{type(exc).__name__}: {exc}"[:500])
        except Exception as exc:  # bad keys in a subscription must not stop the others
            return Outcome("failed", f"{type(exc).__name__}: {exc}"[:500])
        return Outcome("sent")
