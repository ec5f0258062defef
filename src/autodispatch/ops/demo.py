"""Demo accounts for `autodispatch serve --demo` (password ``demo-password``)."""

from __future__ import annotations

from dataclasses import dataclass

from autodispatch.db.database import Database
from autodispatch.domain.errors import Conflict
from autodispatch.identity.accounts import Accounts

DEMO_PASSWORD = "demo-password"
DEMO_WORKSHOP = "Demo Workshop"


@dataclass(frozen=True)
class DemoAccount:
    email: str
    account_type: str
    name: str
    workshop: str | None = None


DEMO_ACCOUNTS = (
    DemoAccount("customer@demo.test", "customer", "Casey Customer"),
    DemoAccount("mechanic@demo.test", "mechanic", "Morgan Mechanic"),
    DemoAccount("workshop.mechanic@demo.test", "mechanic", "Wren Workshop", DEMO_WORKSHOP),
    DemoAccount("admin@demo.test", "admin", "Avery Admin"),
)


async def ensure_demo_accounts(db: Database, accounts: Accounts) -> list[tuple[DemoAccount, bool]]:
    """Create the demo accounts that do not exist yet; say which were created."""
    created: list[tuple[DemoAccount, bool]] = []
    for demo in DEMO_ACCOUNTS:
        async with db.as_service() as tx:
            exists = await tx.one("user_by_email", {"email": demo.email})
        if exists:
            created.append((demo, False))
            continue
        try:
            await accounts.create_user(
                email=demo.email,
                password=DEMO_PASSWORD,
                account_type=demo.account_type,
                full_name=demo.name,
                workshop=demo.workshop,
            )
            created.append((demo, True))
        except Conflict:  # another server created it at the same moment
            created.append((demo, False))
    return created
