"""Offer expiry: accept, decline and offer treat an offer past its expiry as expired.

Revision ID: 0005
Revises: 0004
"""

from autodispatch.db.migrate import run_sql_file

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0005_offer_expiry.sql")


def downgrade() -> None:
    raise RuntimeError("migrations are append-only; restore from a backup instead")
