"""Event ids given after commit by the sequencer; writers share no lock and send no NOTIFY.

Revision ID: 0008
Revises: 0007
"""

from autodispatch.db.migrate import run_sql_file

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0008_event_sequencer.sql")


def downgrade() -> None:
    raise RuntimeError("migrations are append-only; restore from a backup instead")
