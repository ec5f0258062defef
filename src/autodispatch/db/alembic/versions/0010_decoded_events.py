"""The event log's rows made from decoded changes, as capture makes them (realtime.decoded_events).

Revision ID: 0010
Revises: 0009
"""

from autodispatch.db.migrate import run_sql_file

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0010_decoded_events.sql")


def downgrade() -> None:
    raise RuntimeError("migrations are append-only; restore from a backup instead")
