"""The ``autodispatch`` command. Its commands live by job: ``server`` (serve, migrate,
create-user, db-url), ``operations`` (audit, repair, probe, explain-delivery), ``bench``
(the benchmarks); ``app`` holds the Typer app and what they share. They are registered
here, in the order ``--help`` lists them."""

from autodispatch.cli import bench, operations, server
from autodispatch.cli.app import app, main

app.command()(server.serve)
app.command()(server.migrate)
app.command("create-user")(server.create_user)
app.command("db-url")(server.db_url)
app.command()(operations.audit)
app.command()(operations.repair)
app.command()(operations.probe)
app.command("explain-delivery")(operations.explain_delivery_command)
app.add_typer(bench.bench_app, name="bench")

__all__ = ["app", "main"]
