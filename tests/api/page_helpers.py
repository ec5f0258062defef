"""Helpers for the page API tests: a Server-Sent Events reader, and a local Web Push service.

The push service is what a browser vendor runs: an HTTPS endpoint on 127.0.0.1 that
records each POST. Its certificate is self-signed: a test trusts it through
``SSL_CERT_FILE`` (set before the app is made), and lets the sender reach it, a
loopback address, through the ``push_allowed_hosts`` setting
(``AUTODISPATCH_PUSH_ALLOWED_HOSTS``), as an operator would for a push service inside
their network. A ``Browser`` holds what a browser keeps for one subscription (the P-256
key pair and the auth secret), so a test can decrypt what was pushed, as the browser
would.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import json
import os
import re
import ssl
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import http_ece
import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from autodispatch.app import create_app
from conftest import SSE, World, make_settings


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def metric(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    """A sample's value in /metrics (0 when absent)."""
    text = (await client.get("/metrics")).text
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        if dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or "")) == labels:
            return float(match.group(3))
    return 0.0


# --- Server-Sent Events -------------------------------------------------------------------


@asynccontextmanager
async def sse(
    client: httpx.AsyncClient, base: str, headers: dict[str, str], tables: str
) -> AsyncIterator[SSE]:
    async with client.stream(
        "GET", f"{base}/realtime/v1/sse?tables={tables}", headers=headers
    ) as response:
        assert response.status_code == 200, await response.aread()
        reader = SSE(response)
        first = await reader.next()
        assert first["event"] == "subscribed"
        yield reader


# --- A local Web Push service --------------------------------------------------------------


@dataclass
class Browser:
    """What a browser keeps for one push subscription."""

    private_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    auth_secret: bytes = field(default_factory=lambda: os.urandom(16))

    @property
    def p256dh(self) -> str:
        return b64url(
            self.private_key.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
        )

    @property
    def auth(self) -> str:
        return b64url(self.auth_secret)

    def decrypt(self, body: bytes) -> dict[str, Any]:
        plain = http_ece.decrypt(
            body, private_key=self.private_key, auth_secret=self.auth_secret, version="aes128gcm"
        )
        result: dict[str, Any] = json.loads(plain)
        return result


@dataclass
class Push:
    path: str
    headers: dict[str, str]
    body: bytes


class PushService:
    """An HTTPS push service on 127.0.0.1 that records every push. Per path: ``answers``
    gives the status it replies with (201 otherwise), ``bodies`` the body of that reply,
    ``locations`` a Location header (for a redirect); a path in ``trickle`` answers one
    byte every 0.2 s; while ``hold`` is set, a push waits (up to 30 s) for it to clear."""

    def __init__(self, folder: Path) -> None:
        self.pushes: list[Push] = []
        self.answers: dict[str, int] = {}
        self.bodies: dict[str, bytes] = {}
        self.locations: dict[str, str] = {}
        self.trickle: set[str] = set()
        self.held = threading.Event()  # set while a push is waiting on ``hold``
        self.hold = threading.Event()
        self.arrived = threading.Condition()
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        self.ca_file = folder / "push-service-cert.pem"
        self.ca_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file = folder / "push-service-key.pem"
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.ca_file, key_file)
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                with service.arrived:
                    service.pushes.append(
                        Push(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                    )
                    service.arrived.notify_all()
                if service.hold.is_set():
                    service.held.set()
                    deadline = time.monotonic() + 30
                    while service.hold.is_set() and time.monotonic() < deadline:
                        time.sleep(0.02)
                if self.path in service.trickle:
                    self._trickle()
                    return
                status = service.answers.get(self.path, 201)
                reply = service.bodies.get(self.path, b"")
                self.send_response(status)
                if self.path in service.locations:
                    self.send_header("location", service.locations[self.path])
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def _trickle(self) -> None:
                """A status line, one byte every 0.2 s, for up to 30 s."""
                for byte in b"HTTP/1.1 201 Created\r\nx-slow: " + b"a" * 150:
                    try:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                    except OSError:
                        return
                    time.sleep(0.2)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.origin = f"https://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def endpoint(self, name: str) -> str:
        return f"{self.origin}/push/{name}"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def to(self, name: str) -> list[Push]:
        return [p for p in self.pushes if p.path == f"/push/{name}"]

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Push]:
        """At least ``count`` pushes in all, once they have arrived."""

        def wait() -> list[Push]:
            with self.arrived:
                self.arrived.wait_for(lambda: len(self.pushes) >= count, timeout)
                return list(self.pushes)

        pushes = await asyncio.to_thread(wait)
        assert len(pushes) >= count, f"{len(pushes)} pushes arrived, expected {count}"
        return pushes

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def check_vapid(push: Push, public_key: str, origin: str, subject: str) -> dict[str, Any]:
    """The push's VAPID Authorization (RFC 8292) is signed by ``public_key`` for this push
    service; its claims."""
    scheme, _, params = push.headers["authorization"].partition(" ")
    assert scheme == "vapid"
    parts = dict(item.split("=", 1) for item in params.split(","))
    assert parts["k"] == public_key
    point = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b64url_decode(parts["k"]))
    claims: dict[str, Any] = jwt.decode(
        parts["t"], key=point, algorithms=["ES256"], audience=origin
    )
    assert claims["sub"] == subject
    now = datetime.datetime.now(datetime.UTC).timestamp()
    assert now < claims["exp"] <= now + 24 * 3600  # RFC 8292: at most 24 hours ahead
    return claims


@asynccontextmanager
async def open_world(db_url: str, tmp_path: Path, **settings: Any) -> AsyncIterator[World]:
    """The ``world`` fixture's marketplace, with these settings changed."""
    app = create_app(make_settings(tmp_path, **settings), db_url)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        world = World(app, client, *([None] * 9))  # type: ignore[arg-type]
        await world.populate()
        yield world
