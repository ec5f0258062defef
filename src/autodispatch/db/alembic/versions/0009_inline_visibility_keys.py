"""The visibility key functions are inlined into the queries that call them (immutable bodies).

Revision ID: 0009
Revises: 0008
"""

from autodispatch.db.migrate import run_sql_file

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0009_inline_visibility_keys.sql")


def downgrade() -> None:
    raise RuntimeError("migrations are append-only; restore from a backup instead")
