"""The VAPID keys (RFC 8292) that sign our pushes: given in the settings, else made once into
the home folder (as the JWT secret is). Servers sharing a database must share the key,
or push services refuse the pushes of all but one."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid02  # type: ignore[import-untyped]

from autodispatch.config import Settings

KEY_FILE = "vapid_private_key.pem"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


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
