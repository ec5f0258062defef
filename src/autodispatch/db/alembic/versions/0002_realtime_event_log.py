"""The realtime event log: events written by triggers, ids that commit in order.

Revision ID: 0002
Revises: 0001
"""

from autodispatch.db.migrate import run_sql_file

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0002_realtime_event_log.sql")


def downgrade() -> None:
    raise RuntimeError("migrations are append-only; restore from a backup instead")
