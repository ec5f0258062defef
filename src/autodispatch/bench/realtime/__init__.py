"""Benchmark: realtime delivery (``autodispatch bench realtime``), a command that prints figures.

A real ``autodispatch serve`` runs in its own process (on an embedded PostgreSQL in a
temporary home, or on ``--database-url``). The load runs in other processes: subscriber
processes (``multiprocessing``) hold the WebSocket connections, speaking the Supabase
Realtime protocol (vsn 1.0.0) on plain asyncio transports: the handshake through the
``websockets`` package's sans-I/O client, then frames read by ``frames.py``, so that a
received frame costs the generator a few microseconds; this process writes the events
straight into the database as the service
(one SQL statement per lifecycle step; the triggers write the event log), at a target
rate, from several connections.

The same run measures two routing strategies of the gateway, on the same accounts and
workload: ``keys`` (the visibility-key index) and ``per_subscriber_sql`` (one SQL
visibility query per subscriber per event, the hosted service's method; see
``realtime/baseline.py``). Figures:

- commit-to-received latency: ``data.commit_timestamp`` (set in the committing
  transaction) against the subscriber process's clock when the frame arrives, on one
  gateway and again with the subscribers spread over several ``serve`` processes;
- a ramp of event rates until the server falls behind: the most deliveries per second it
  kept up with, and the most with p99 at or under 100 ms;
- server memory per idle joined connection (RSS of the serve process before and after);
- database statements per event at 100 and at many subscribers, from the server's own
  counter (``autodispatch_realtime_db_statements_total``) and from ``pg_stat_statements``.

The workload is a marketplace: independent mechanics and workshop mechanics (20
workshops) watch the queue (``session_assignments``, unfiltered) and their own sessions
(``sessions``, ``mechanic_id=eq.<id>``); customers watch their own requests (both tables,
``customer_id=eq.<id>``); a few admins watch everything. Requests are general (every
mechanic may take them) or for one workshop, and go through their lifecycle: created,
queued, accepted, started, completed.

This package must not import ``autodispatch.realtime`` (benchmarks sit in the layer of
routes and operations, below it): the client frames are written here with ``json``.

The package: ``report`` (options and figures), ``workload`` (accounts, joins, the event
writer), ``clients`` (the subscriber processes, from the parent), ``subscriber`` (one of them)
and ``frames``, ``server`` (the serve
processes and what they report), ``run`` (the measurements, in order) and ``render``
(targets and tables).
"""

from autodispatch.bench.realtime.render import Verdict, render, verdicts
from autodispatch.bench.realtime.report import RealtimeOptions, Report, Window
from autodispatch.bench.realtime.run import realtime

__all__ = ["RealtimeOptions", "Report", "Verdict", "Window", "realtime", "render", "verdicts"]
