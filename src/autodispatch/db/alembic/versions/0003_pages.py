"""What the pages need: session chat, alert receipts, push subscriptions, probe pings.

Revision ID: 0003
Revises: 0002
"""

from autodispatch.db.migrate import run_sql_file

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0003_pages.sql")


def downgrade() -> None:
    raise RuntimeError("migrations are append-only; restore from a backup instead")
