"""Principal changes: a change to what a user may see is an event; disabled accounts.

Revision ID: 0006
Revises: 0005
"""

from autodispatch.db.migrate import run_sql_file

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0006_principal_changes.sql")


def downgrade() -> None:
    raise RuntimeError("migrations are append-only; restore from a backup instead")
