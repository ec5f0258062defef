"""Where Web Push may go, and how one push is POSTed there.

A push subscription's endpoint is a URL our server will POST to, and anyone with a
mechanic's token can save one: without rules it would let them aim the server at
services inside its own network (the database, a metadata service, an admin port). The
rules, checked when a subscription is saved and again on every connection the sender
opens:

- https, and a host *name* with at least one dot: no IP address, no ``localhost``, no
  single-label name (one a resolver's search list could complete to an internal host);
- every address that name resolves to is public (not private, loopback, link-local,
  shared, reserved, unspecified, multicast, nor an IPv6 form embedding such an IPv4
  address), and the connection goes to one of those very addresses: there is no second
  lookup for a short-lived DNS answer to change (DNS rebinding);
- hosts listed in ``AUTODISPATCH_PUSH_ALLOWED_HOSTS`` are exempt (a push service inside
  your own network; the tests' local one). Empty by default.

A POST follows no redirects (httpcore never does; a 3xx is a failed push), must be over
within a total deadline (connect, TLS, request, status line and the few bytes of body
read), and the push service's own words are never stored: ``last_error`` gets the
status code and our short reason.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import certifi
import httpcore

Resolver = Callable[[str, int], Awaitable[list[str]]]

# RFC 6052's well-known NAT64 prefix: the last 32 bits are the IPv4 address reached.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# A push service's answer body is read (so the connection can be reused) up to this much.
_MAX_BODY = 4096


class EndpointRefused(Exception):
    """The sender must not connect there; the message says why, in our words."""


@dataclass(frozen=True)
class Outcome:
    kind: str  # "sent", "failed" or "gone"
    error: str | None = None


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (the system resolver, as a connection would)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_public_address(text: str) -> bool:
    """True for an address on the public internet; False for private, loopback,
    link-local, shared (CGNAT), reserved, documentation, unspecified and multicast ones,
    and for IPv6 forms (mapped, 6to4, NAT64) that embed such an IPv4 address."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
        if embedded is not None:
            return is_public_address(str(embedded))
    return address.is_global and not address.is_multicast


def _normal_host(host: str) -> str:
    """Lower case, no trailing dot, no IPv6 brackets; IP addresses in their short form."""
    host = host.strip().strip("[]").rstrip(".").lower()
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


class EndpointPolicy:
    """Which push endpoints the server may reach (see the module's docstring)."""

    def __init__(
        self,
        allowed_hosts: Iterable[str] = (),
        *,
        resolve: Resolver = resolve_host,
        resolve_timeout: float = 5.0,
    ) -> None:
        self.allowed_hosts = frozenset(_normal_host(h) for h in allowed_hosts if h.strip())
        self.resolve = resolve  # replaceable: tests answer for names without a DNS server
        self.resolve_timeout = resolve_timeout

    def allowed_by_setting(self, host: str) -> bool:
        return _normal_host(host) in self.allowed_hosts

    async def addresses(self, host: str, port: int) -> list[str]:
        """The addresses to connect to for ``host``: all of them public. Raises
        EndpointRefused for an IP address, localhost, a single-label name, a name that
        does not resolve, or one with any non-public address."""
        name = _normal_host(host)
        if _is_ip(name):
            raise EndpointRefused("the host is an IP address, not the push service's name")
        if name == "localhost" or name.endswith(".localhost") or "." not in name:
            raise EndpointRefused(f"{name!r} is not a public host name")
        try:
            async with asyncio.timeout(self.resolve_timeout):
                found = await self.resolve(name, port)
        except (OSError, TimeoutError):
            raise EndpointRefused(f"{name} does not resolve") from None
        if not found:
            raise EndpointRefused(f"{name} does not resolve")
        if not all(is_public_address(address) for address in found):
            raise EndpointRefused(f"{name} resolves to an address that is not public")
        return found

    async def check_endpoint(self, endpoint: str) -> None:
        """Raises EndpointRefused unless the sender may push to this https URL."""
        parts = urlsplit(endpoint)
        host = parts.hostname or ""
        if parts.scheme != "https" or not host:
            raise EndpointRefused("the endpoint is not an https URL")
        if self.allowed_by_setting(host):
            return
        await self.addresses(host, parts.port or 443)


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only where ``EndpointPolicy`` allows: to the
    very addresses it checked."""

    def __init__(
        self, policy: EndpointPolicy, inner: httpcore.AsyncNetworkBackend | None = None
    ) -> None:
        self.policy = policy
        self.inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if self.policy.allowed_by_setting(host):
            targets = [host]
        else:
            targets = await self.policy.addresses(host, port)
        options = list(socket_options or ())
        failure: Exception | None = None
        for target in targets:
            try:
                return await self.inner.connect_tcp(
                    target,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None  # targets is never empty
        raise failure

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise EndpointRefused("push endpoints are reached over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def default_ssl_context() -> ssl.SSLContext:
    """The system's certificate authorities (``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` apply,
    as in OpenSSL) and certifi's, so a container without a CA store still verifies."""
    context = ssl.create_default_context()
    context.load_verify_locations(certifi.where())
    return context


def outcome_for_status(status: int) -> Outcome:
    if 200 <= status < 300:
        return Outcome("sent")
    if status in (404, 410):
        return Outcome("gone", f"HTTP {status}")
    if 300 <= status < 400:
        return Outcome("failed", f"HTTP {status}: redirects are not followed")
    try:
        return Outcome("failed", f"HTTP {status} {HTTPStatus(status).phrase}")
    except ValueError:
        return Outcome("failed", f"HTTP {status}")


def _failure_text(exc: Exception, deadline: float) -> str:
    """Our words for a failed POST: never the push service's, nor a URL or address."""
    if isinstance(exc, EndpointRefused):
        return f"endpoint refused: {exc}"
    if isinstance(exc, TimeoutError):
        return f"no answer within {deadline:g} s"
    if isinstance(exc, httpcore.TimeoutException):
        return "timed out"
    if isinstance(exc, httpcore.ConnectError):
        cause = exc.__cause__ or exc.__context__
        return "TLS handshake failed" if isinstance(cause, ssl.SSLError) else "could not connect"
    if isinstance(exc, httpcore.RemoteProtocolError):
        return "the push service broke the HTTP protocol"
    if isinstance(exc, httpcore.NetworkError | OSError):
        return "the connection failed"
    return f"the push could not be sent ({type(exc).__name__})"


class PushClient:
    """POSTs pushes: through ``GuardedBackend``, no redirects, a total deadline each."""

    def __init__(
        self,
        policy: EndpointPolicy,
        *,
        deadline: float = 10.0,
        connect_timeout: float = 5.0,
        read_timeout: float = 5.0,
        max_connections: int = 16,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.policy = policy
        self.deadline = deadline
        self.timeouts = {
            "connect": connect_timeout,
            "read": read_timeout,
            "write": read_timeout,
            "pool": deadline,
        }
        self.max_connections = max_connections
        self.ssl_context = ssl_context or default_ssl_context()
        self._pool: httpcore.AsyncConnectionPool | None = None

    def _connections(self) -> httpcore.AsyncConnectionPool:
        if self._pool is None:
            self._pool = httpcore.AsyncConnectionPool(
                ssl_context=self.ssl_context,
                max_connections=self.max_connections,
                keepalive_expiry=30.0,
                network_backend=GuardedBackend(self.policy),
            )
        return self._pool

    async def post(self, endpoint: str, headers: Mapping[str, str], body: bytes) -> Outcome:
        """One push; never raises for what the network or the push service did."""
        try:
            async with asyncio.timeout(self.deadline):
                async with self._connections().stream(
                    "POST",
                    endpoint,
                    headers=list(headers.items()),
                    content=body,
                    extensions={"timeout": self.timeouts},
                ) as response:
                    read = 0
                    async for chunk in response.aiter_stream():
                        read += len(chunk)
                        if read > _MAX_BODY:
                            break  # the connection is closed rather than reused
                    return outcome_for_status(response.status)
        except Exception as exc:  # one endpoint's failure must not stop the others
            return Outcome("failed", _failure_text(exc, self.deadline))

    async def aclose(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.aclose()
