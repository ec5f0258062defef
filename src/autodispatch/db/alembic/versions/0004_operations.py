"""Operations: a heartbeat row per gateway process, for `autodispatch audit`.

Revision ID: 0004
Revises: 0003
"""

from autodispatch.db.migrate import run_sql_file

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0004_operations.sql")


def downgrade() -> None:
    raise RuntimeError("migrations are append-only; restore from a backup instead")
