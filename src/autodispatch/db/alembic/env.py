"""Alembic environment: runs the plain-SQL revisions on the connection it is given.

``autodispatch.db.migrate`` builds the engine and passes its connection in
``config.attributes["connection"]``; nothing here reads settings of its own.
"""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None, transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
