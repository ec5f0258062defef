"""Row events as Server-Sent Events: ``GET /realtime/v1/sse?tables=...``.

``id:`` is the event id (the cursor), ``event: postgres_changes``, ``data:`` the same
``data`` object the WebSocket sends. ``Last-Event-ID`` (or ``last_event_id=``) resumes;
a cursor older than the retention window gets 409 ``resync_required`` (an EventSource
stops on a non-200 answer instead of looping).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from autodispatch.api import deps
from autodispatch.domain.errors import BadRequest, InvalidInput
from autodispatch.domain.principal import Principal
from autodispatch.realtime.events import Event
from autodispatch.realtime.hub import Hub
from autodispatch.realtime.queue_sink import QueueSink
from autodispatch.realtime.router import Binding

router = APIRouter(tags=["realtime"])

KEEPALIVE_SECONDS = 15.0


def hub(request: Request) -> Hub:
    found: Hub = request.app.state.realtime
    return found


CLOSE_MESSAGES = {
    "token_expired": "Token has expired: sign in again, then resume with Last-Event-ID",
    "slow_consumer": "SlowConsumer: you fell behind; resume with Last-Event-ID",
    "shutdown": "ServerShutdown: reconnect and resume with Last-Event-ID",
    "resync_required": "ResyncRequired: the events after your cursor are no longer all kept;"
    " reload your data, then subscribe without Last-Event-ID",
    "replay_failed": "ReplayFailed: the server could not read what you missed;"
    " resume with Last-Event-ID",
}


def _system_error(message: str) -> bytes:
    data = json.dumps({"status": "error", "message": message})
    return f"event: system\ndata: {data}\n\n".encode()


def _sse_frame(event: Event, ids: tuple[int, ...], data_json: str) -> bytes:
    if not event.moves_cursor:  # a removal before the last of its key change, or a frame
        # before the last of an event's frames: no cursor
        return f"event: postgres_changes\ndata: {data_json}\n\n".encode()
    return f"id: {event.id}\nevent: postgres_changes\ndata: {data_json}\n\n".encode()


@router.get(
    "/realtime/v1/sse",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def sse(
    request: Request,
    tables: str = Query(
        default="sessions,session_assignments,feature_flags",
        description="Comma-separated tables of the public schema",
    ),
    last_event_id: str | None = Query(default=None, description="Resume after this cursor"),
    caller: Principal = Depends(deps.principal),
    realtime: Hub = Depends(hub),
) -> StreamingResponse:
    """Row events the caller may see, as they commit; resumable with `Last-Event-ID`."""
    wanted = [t.strip() for t in tables.split(",") if t.strip()]
    unknown = sorted(set(wanted) - set(realtime.tables))
    if unknown or not wanted:
        raise InvalidInput(
            f"unknown table(s) {', '.join(unknown) or '(none)'}; choose from"
            f" {', '.join(realtime.tables)}",
            code="unknown_table",
        )
    cursor_text = request.headers.get("last-event-id") or last_event_id
    resume_from: int | None = None
    if cursor_text:
        if not cursor_text.isdigit():
            raise BadRequest(
                f"Last-Event-ID {cursor_text!r} is not a cursor this server gave out",
                code="invalid_cursor",
            )
        resume_from = int(cursor_text)
    bindings = tuple(Binding(id=i, table=t, event="*") for i, t in enumerate(dict.fromkeys(wanted)))
    sink = QueueSink(realtime.settings.queue_size, _sse_frame)
    sub = await realtime.subscribe(caller, bindings, sink, "sse", resume_from)
    expires = caller.claims.get("exp") if not caller.is_anonymous else None
    metrics = realtime.metrics

    frames_sent = metrics.sent.transport("sse")

    def sent(event: Event) -> None:
        frames_sent.sent(time.time() - event.at_ts)

    def expired() -> bool:
        return expires is not None and time.time() >= float(expires)

    async def stream() -> AsyncIterator[bytes]:
        reason = "client_closed"
        catching_up: asyncio.Task[None] | None = None
        try:
            yield f'retry: 2000\nevent: subscribed\ndata: {{"cursor": {sub.cursor}}}\n\n'.encode()
            # What the client missed is replayed while this loop drains the queue.
            catching_up = asyncio.create_task(realtime.catch_up(sub), name="sse-catch-up")
            while True:
                try:
                    event, frame = await asyncio.wait_for(sink.queue.get(), KEEPALIVE_SECONDS)
                except TimeoutError:
                    event, frame = None, b": keepalive\n\n"
                if expired():
                    sink.close("token_expired")
                if sink.closed_reason is not None:
                    reason = sink.closed_reason
                    yield _system_error(CLOSE_MESSAGES.get(reason, reason))
                    return
                yield frame
                if event is not None:
                    sent(event)
        finally:
            if catching_up is not None and not catching_up.done():
                catching_up.cancel()
            realtime.unsubscribe(sub)
            metrics.disconnects.labels("sse", reason).inc()

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
