"""Settings, read from the environment when the app or a command starts (never at import)."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path

import platformdirs

# Not settings: how long past a promise the audit, `repair` and the health gauges call a
# thing stuck. Expiry runs every ``expiry_interval_seconds`` (0.5 s); an offer or request
# still past its time after this long is not being expired.
EXPIRY_GRACE_SECONDS = 30
# Every server gives committed events their ids within its sequence poll interval (0.05 s
# by default, db/sequencer.py); an event without one after this long means no server is
# doing it, and no subscriber has received it.
SEQUENCE_GRACE_SECONDS = 10


def default_home() -> Path:
    return Path(platformdirs.user_data_dir("autodispatch", appauthor=False))


def _int(env: dict[str, str], name: str, default: int) -> int:
    """A whole number of at least 1 (every count and duration here); ``default`` when
    unset. 0 would not mean "off": a queue of 0 frames closes every subscriber, a pool of
    0 connections answers nothing."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be a whole number, not {raw!r}") from None
    if value < 1:
        raise SystemExit(f"{name} must be at least 1, not {raw!r}")
    return value


def _seconds(env: dict[str, str], name: str, default: float, *, most: float) -> float:
    """A number of seconds, more than 0 and at most ``most``; ``default`` when unset."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"{name} must be a number of seconds, not {raw!r}") from None
    if not 0 < value <= most:  # also refuses nan and inf
        raise SystemExit(f"{name} must be more than 0 and at most {most:g} seconds, not {raw!r}")
    return value


def _list(env: dict[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated list (spaces around items ignored); empty when unset."""
    return tuple(item.strip() for item in (env.get(name) or "").split(",") if item.strip())


def _choice(env: dict[str, str], name: str, choices: tuple[str, ...]) -> str:
    """The variable's value, one of ``choices``; the first when unset."""
    raw = env.get(name) or choices[0]
    if raw not in choices:
        raise SystemExit(f"{name} must be one of {', '.join(choices)}, not {raw!r}")
    return raw


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str | None = None
    jwt_secret: str = field(default="", repr=False)
    access_token_ttl_seconds: int = 3600
    refresh_token_ttl_seconds: int = 30 * 24 * 3600
    request_ttl_seconds: int = 30 * 60
    expiry_interval_seconds: float = 0.5
    stripe_webhook_secret: str | None = field(default=None, repr=False)
    sign_in_max_failures_per_account: int = 5
    sign_in_max_failures_per_address: int = 20
    sign_in_window_seconds: int = 15 * 60
    cheap_password_hashing: bool = False  # tests only: argon2 at its cheapest
    db_pool_max: int = 20
    event_retention_seconds: int = 7 * 24 * 3600
    realtime_poll_interval: float = 0.25
    # Events written by SQL from outside a server process (an operator, another program)
    # get their ids within this many seconds; a server's own writes at once after their
    # commit (realtime/sequencer.py). The readers deliver nothing before.
    realtime_sequence_poll_interval: float = 0.05
    # The least time between two numbering runs of a process: under load one run numbers
    # the commits of this interval in one transaction (not one each); with sparse writes
    # the next commit comes later anyway, so nothing waits (docs/decisions.md).
    realtime_sequence_spacing: float = 0.002
    realtime_queue_size: int = 1000
    # How often each process tells the others on the bus it is alive; one silent for three
    # of its intervals has its presences dropped everywhere (realtime/peers.py). At most
    # an hour: the other processes ignore presence from one that claims longer.
    realtime_presence_interval: float = 5.0
    # "keys" (the visibility-key index) or "per_subscriber_sql": the hosted service's
    # method, one SQL query per subscriber per event, kept only as the baseline that
    # `autodispatch bench realtime` measures against (realtime/baseline.py).
    realtime_routing: str = "keys"
    # Web Push (VAPID, RFC 8292): the private key, given (PEM, or the base64url raw key that
    # `web-push generate-vapid-keys` prints), else kept in the home folder
    # (api/push_sender.py); servers sharing a database must share it. The subject is the
    # contact push services see.
    vapid_private_key: str = field(default="", repr=False)
    vapid_subject: str = "mailto:admin@localhost"
    # Hosts (names or IP addresses) the push sender may reach although they are not public:
    # a push service inside your own network, or the tests' local one. Empty (the default):
    # push endpoints must be public names resolving only to public addresses
    # (api/push_network.py), so a subscription cannot aim the server at internal services.
    push_allowed_hosts: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: object) -> Settings:
        env = dict(os.environ if env is None else env)
        home = Path(env.get("AUTODISPATCH_HOME") or default_home()).expanduser()
        values: dict[str, object] = {
            "home": home,
            "database_url": env.get("DATABASE_URL") or None,
            "jwt_secret": env.get("AUTODISPATCH_JWT_SECRET") or "",
            "access_token_ttl_seconds": _int(env, "AUTODISPATCH_ACCESS_TOKEN_TTL", 3600),
            "request_ttl_seconds": _int(env, "AUTODISPATCH_REQUEST_TTL_SECONDS", 30 * 60),
            "stripe_webhook_secret": env.get("STRIPE_WEBHOOK_SECRET") or None,
            "db_pool_max": _int(env, "AUTODISPATCH_DB_POOL_MAX", 20),
            "event_retention_seconds": _int(
                env, "AUTODISPATCH_EVENT_RETENTION_SECONDS", 7 * 24 * 3600
            ),
            "realtime_queue_size": _int(env, "AUTODISPATCH_REALTIME_QUEUE_SIZE", 1000),
            "realtime_sequence_poll_interval": _seconds(
                env, "AUTODISPATCH_REALTIME_SEQUENCE_POLL_INTERVAL", 0.05, most=10
            ),
            "realtime_sequence_spacing": _seconds(
                env, "AUTODISPATCH_REALTIME_SEQUENCE_SPACING", 0.002, most=0.1
            ),
            "realtime_presence_interval": _seconds(
                env, "AUTODISPATCH_REALTIME_PRESENCE_INTERVAL", 5.0, most=3600
            ),
            "realtime_routing": _choice(
                env, "AUTODISPATCH_REALTIME_ROUTING", ("keys", "per_subscriber_sql")
            ),
            "vapid_private_key": env.get("AUTODISPATCH_VAPID_PRIVATE_KEY") or "",
            "vapid_subject": env.get("AUTODISPATCH_VAPID_SUBJECT") or "mailto:admin@localhost",
            "push_allowed_hosts": _list(env, "AUTODISPATCH_PUSH_ALLOWED_HOSTS"),
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    def with_secret(self) -> Settings:
        """These settings with a JWT secret: the given one, or one kept in the home folder."""
        if self.jwt_secret:
            return self
        path = self.home / "jwt_secret"
        if not path.exists():
            self.home.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".jwt_secret.{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(48))
            try:
                # Link, not rename: if another process made one first, keep theirs.
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        secret = path.read_text().strip()
        if len(secret) < 32:
            raise SystemExit(f"{path} holds a secret shorter than 32 characters; delete it")
        return replace(self, jwt_secret=secret)
