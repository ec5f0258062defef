"""Who is asking: the claims of a verified access token, or nobody."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from uuid import UUID


@dataclass(frozen=True)
class Principal:
    """The caller of one request. ``user_id`` is None for an anonymous caller."""

    user_id: UUID | None
    role: str  # the database role: 'authenticated' or 'anon'
    account_type: str | None = None  # 'customer', 'mechanic' or 'admin'
    email: str | None = None
    claims: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def is_anonymous(self) -> bool:
        return self.user_id is None


ANONYMOUS = Principal(user_id=None, role="anon", claims={"role": "anon"})
