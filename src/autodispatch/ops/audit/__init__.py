"""`autodispatch audit`: is this database what dispatch needs, and is its data consistent?

Three areas of checks (``schema`` and ``data`` hold them; ``context`` what each check
works with; ``run`` runs them and renders the report):

- **schema**: migrations at head, the tables, every status the constraints allow against
  ``domain/lifecycle.py``, the transition table, the lifecycle and event-log triggers
  present and enabled, row-level security on every public table with exactly the
  expected policies and nothing broader, no write privileges for the API's roles;
- **data**: sessions and assignments that disagree (``CONSISTENT_PAIRS``), sessions
  without an assignment, unknown statuses, offers past their expiry, requests past their
  time to live, stale session visibility keys;
- **realtime**: the event log's head, events that never got an id, the gateways' heartbeats
  (which run, which lag, which died) and their subscribers, the Web Push cursor.

Everything is read with catalog queries and plain SQL in one read-only snapshot, so it
also runs on a database the first version wrote: a piece that is missing is a finding,
never a crash (each check runs in its own savepoint; one that fails is reported as
``check_failed`` and the others still run). Each finding names the rows involved and the
fix; ``repairable`` ones are fixed by `autodispatch repair --apply`.
"""
