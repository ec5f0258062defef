"""The realtime schema's functions are not executable by PUBLIC.

Revision ID: 0007
Revises: 0006
"""

from autodispatch.db.migrate import run_sql_file

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0007_realtime_privileges.sql")


def downgrade() -> None:
    raise RuntimeError("migrations are append-only; restore from a backup instead")
