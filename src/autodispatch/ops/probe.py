"""`autodispatch probe`: an end-to-end delivery check as one user, through the public protocol.

The probe does what a client does and times each step: read the public config, sign in,
open the realtime WebSocket, join a channel subscribed to ``probe_pings`` (a table whose
rows only their author may see), cause a harmless change (``POST /api/probe/ping``) and
wait for its event. The first step that fails stops the probe and is named, with what
the server said. When the change was made but its event never came, the caller can ask
the event log why (``explain_missing``): which visibility key or filter did not match.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from autodispatch.db.database import Database

PROBE_TABLE = "probe_pings"
TOPIC = "realtime:autodispatch-probe"


@dataclass(frozen=True)
class Step:
    name: str
    ok: bool
    detail: str
    ms: float


@dataclass
class ProbeResult:
    email: str
    steps: list[Step] = field(default_factory=list)
    user_id: str | None = None
    ping_id: str | None = None
    latency_ms: float | None = None  # from the ping request to its event
    commit_to_receive_ms: float | None = None

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(s.ok for s in self.steps)

    @property
    def failed(self) -> Step | None:
        return next((s for s in self.steps if not s.ok), None)

    def as_json(self) -> dict[str, Any]:
        return {
            "email": self.email,
            "ok": self.ok,
            "user_id": self.user_id,
            "ping_id": self.ping_id,
            "latency_ms": self.latency_ms,
            "commit_to_receive_ms": self.commit_to_receive_ms,
            "steps": [s.__dict__ for s in self.steps],
        }


class StepFailed(Exception):
    """A probe step did not work; the message says what the server or network said."""


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            return f"{response.status_code} {err.get('code')}: {err.get('message')}"
        if isinstance(body, dict) and "error_description" in body:
            return f"{response.status_code} {body.get('error')}: {body['error_description']}"
    except ValueError:
        pass
    return f"{response.status_code}: {response.text[:200]}"


def _unexpected(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"the answer is not JSON ({exc.msg} at character {exc.pos}): {exc.doc[:120]!r}"
    if isinstance(exc, KeyError):
        return f"the answer has no {exc.args[0]!r} field"
    return f"unexpected answer: {type(exc).__name__}: {str(exc)[:200]}"


def websocket_url(base_url: str, anon_key: str) -> str:
    parts = urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    path = parts.path.rstrip("/") + "/realtime/v1/websocket"
    query = urlencode({"apikey": anon_key, "vsn": "1.0.0"})
    return urlunsplit((scheme, parts.netloc, path, query, ""))


class _Probe:
    def __init__(self, result: ProbeResult, timeout: float) -> None:
        self.result = result
        self.timeout = timeout

    async def step(self, name: str, work: Any) -> Any:
        started = time.perf_counter()
        try:
            value, detail = await asyncio.wait_for(work, timeout=self.timeout)
        except StepFailed as exc:
            self._record(name, False, str(exc), started)
            raise
        except TimeoutError:
            self._record(name, False, f"no answer within {self.timeout:g} s", started)
            raise StepFailed(name) from None
        except (httpx.HTTPError, OSError, WebSocketException) as exc:
            self._record(name, False, f"{type(exc).__name__}: {exc}", started)
            raise StepFailed(name) from exc
        except Exception as exc:
            # An answer of the wrong shape (an HTML page where JSON was due, a frame that
            # is not JSON, a body without the field read): this step failed, and says how.
            self._record(name, False, _unexpected(exc), started)
            raise StepFailed(name) from exc
        self._record(name, True, detail, started)
        return value

    def _record(self, name: str, ok: bool, detail: str, started: float) -> None:
        ms = (time.perf_counter() - started) * 1000
        self.result.steps.append(Step(name, ok, detail, round(ms, 1)))


async def _recv_json(ws: ClientConnection) -> dict[str, Any]:
    raw = await ws.recv()
    message = json.loads(raw)
    if not isinstance(message, dict):
        raise StepFailed(f"the server sent a frame that is not a JSON object: {raw!r:.200}")
    return message


async def run_probe(
    base_url: str,
    email: str,
    password: str,
    *,
    row_filter: str | None = None,
    timeout: float = 5.0,
) -> ProbeResult:
    """Probe delivery for one account; never raises for a failed step (it is recorded)."""
    result = ProbeResult(email=email)
    probe = _Probe(result, timeout)
    nonce = "probe-" + secrets.token_hex(8)
    base_url = base_url.rstrip("/")
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout) as http:

        async def config() -> tuple[str, str]:
            response = await http.get("/api/config")
            if response.status_code != 200:
                raise StepFailed(f"GET /api/config answered {_error_text(response)}")
            key = response.json().get("anon_key")
            if not key:
                raise StepFailed("GET /api/config has no anon_key")
            return key, f"{base_url} answers; anon key read"

        async def sign_in() -> tuple[str, str]:
            response = await http.post(
                "/auth/v1/token",
                params={"grant_type": "password"},
                json={"email": email, "password": password},
            )
            if response.status_code != 200:
                raise StepFailed(f"sign-in refused: {_error_text(response)}")
            body = response.json()
            result.user_id = str(body["user"]["id"])
            kind = body["user"].get("app_metadata", {}).get("account_type") or "user"
            return body["access_token"], f"signed in as {email} ({kind} {result.user_id})"

        try:
            anon_key = await probe.step("config", config())
            token = await probe.step("sign-in", sign_in())
            url = websocket_url(base_url, anon_key)
            ws = await probe.step("connect", _connect(url))
        except StepFailed:
            return result
        try:
            await _subscribe_and_ping(probe, ws, http, token, nonce, row_filter)
        except StepFailed:
            pass
        finally:
            await ws.close()
    return result


async def _connect(url: str) -> tuple[ClientConnection, str]:
    ws = await connect(url, open_timeout=None)
    return ws, f"WebSocket open at {url.split('?')[0]}"


async def _subscribe_and_ping(
    probe: _Probe,
    ws: ClientConnection,
    http: httpx.AsyncClient,
    token: str,
    nonce: str,
    row_filter: str | None,
) -> None:
    result = probe.result
    binding: dict[str, Any] = {"event": "*", "schema": "public", "table": PROBE_TABLE}
    if row_filter:
        binding["filter"] = row_filter

    async def subscribe() -> tuple[None, str]:
        join = {
            "topic": TOPIC,
            "event": "phx_join",
            "payload": {
                "config": {
                    "broadcast": {"self": False, "ack": False},
                    "presence": {"key": ""},
                    "postgres_changes": [binding],
                },
                "access_token": token,
            },
            "ref": "1",
            "join_ref": "1",
        }
        await ws.send(json.dumps(join))
        replied = False
        while True:
            message = await _recv_json(ws)
            payload = message.get("payload") or {}
            if message.get("event") == "phx_reply" and message.get("ref") == "1":
                if payload.get("status") != "ok":
                    reason = (payload.get("response") or {}).get("reason") or payload
                    raise StepFailed(f"join refused: {reason}")
                replied = True
            elif message.get("event") == "system" and payload.get("status") == "error":
                raise StepFailed(f"the channel reported an error: {payload.get('message')}")
            elif message.get("event") == "phx_close":
                raise StepFailed("the server closed the channel")
            elif (
                replied
                and message.get("event") == "system"
                and payload.get("extension") == "postgres_changes"
            ):
                where = f" with filter {row_filter}" if row_filter else ""
                return None, f"subscribed to public.{PROBE_TABLE}{where}"

    async def ping() -> tuple[float, str]:
        sent = time.perf_counter()
        response = await http.post(
            "/api/probe/ping",
            json={"nonce": nonce},
            headers={"Authorization": f"Bearer {token}"},
        )
        if response.status_code != 201:
            raise StepFailed(f"POST /api/probe/ping answered {_error_text(response)}")
        result.ping_id = str(response.json()["ping"]["id"])
        return sent, f"probe ping {result.ping_id} written (nonce {nonce})"

    async def delivery(sent: float) -> tuple[None, str]:
        while True:
            message = await _recv_json(ws)
            if message.get("event") != "postgres_changes":
                continue
            data = (message.get("payload") or {}).get("data") or {}
            record = data.get("record") or {}
            if data.get("table") != PROBE_TABLE or record.get("nonce") != nonce:
                continue
            received = time.perf_counter()
            result.latency_ms = round((received - sent) * 1000, 1)
            committed = data.get("commit_timestamp")
            if isinstance(committed, str):
                at = datetime.fromisoformat(committed.replace("Z", "+00:00"))
                lag = (time.time() - at.timestamp()) * 1000
                result.commit_to_receive_ms = round(max(lag, 0.0), 1)
            return None, (
                f"event {data.get('event_id')} received {result.latency_ms} ms after the request"
            )

    await probe.step("subscribe", subscribe())
    sent = await probe.step("change", ping())
    await probe.step("delivery", delivery(sent))


async def explain_missing(db: Database, ping_id: str) -> int | None:
    """The event id of a probe ping's insert, to explain why it was not delivered."""
    async with db.as_service() as tx:
        value = await tx.value("event_for_row", {"table": PROBE_TABLE, "row_id": ping_id})
    return int(value) if value is not None else None
