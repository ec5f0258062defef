"""The upgrade of a native realtime socket: which requests are ours, and the answer.

An upgrade to ``/realtime/v1/websocket`` or ``/socket/websocket`` is ours
(``realtime_path``); any other goes to uvicorn's own protocol. Ours is answered here
(``handshake``): a request that is not a valid WebSocket upgrade gets the parser's own
error response; then the gateway admits the socket (``gateway.admit``: its vsn, its
apikey, room in this process) or refuses it with an HTTP status and a JSON error, the
same as the ASGI routes (``websocket.py``).
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs, unquote

from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from autodispatch.domain.principal import Principal
from autodispatch.realtime import protocol as p
from autodispatch.realtime.gateway import Gateway, Refusal, admit

PATHS = frozenset({"/realtime/v1/websocket", "/socket/websocket"})
_PHRASES = {400: "Bad Request", 401: "Unauthorized", 429: "Too Many Requests"}


def realtime_path(head: bytes) -> bool:
    """Whether the first bytes of an upgrade request ask for a realtime path."""
    target = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
    return unquote(target.split(b"?", 1)[0].decode("latin-1")) in PATHS


def handshake(ws: ServerProtocol, gateway: Gateway) -> tuple[str, Principal] | None:
    """Answer the upgrade request ``ws`` has parsed, in ``ws`` (the caller writes what it
    has to send): accepted, with the socket's vsn and principal; or None, refused."""
    request = next((e for e in ws.events_received() if isinstance(e, Request)), None)
    if request is None:
        return None
    response = ws.accept(request)
    if response.status_code != 101:  # not a valid WebSocket handshake
        ws.send_response(response)
        return None
    query = parse_qs(request.path.partition("?")[2])
    vsn = (query.get("vsn") or [""])[0] or p.VSN_1
    apikey = request.headers.get("x-api-key") or (query.get("apikey") or [""])[0]
    principal = admit(gateway, vsn, apikey)
    if isinstance(principal, Refusal):
        ws.send_response(_refusal(principal))
        return None
    ws.send_response(response)
    return vsn, principal


def _refusal(refusal: Refusal) -> Response:
    body = json.dumps({"error": refusal.message}).encode()
    headers = Headers(
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
    )
    return Response(refusal.status, _PHRASES.get(refusal.status, ""), headers, body)
