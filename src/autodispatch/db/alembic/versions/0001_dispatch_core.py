"""The dispatch core: accounts, requests, lifecycles, row-level security, api functions.

Revision ID: 0001
Revises:
"""

from autodispatch.db.migrate import run_sql_file

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0001_dispatch_core.sql")


def downgrade() -> None:
    raise RuntimeError("migrations are append-only; restore from a backup instead")
