-- 0009: the visibility key functions are inlined into the queries that call them.
--
-- PostgreSQL inlines a one-expression SQL function into the query that calls it (an RLS
-- policy, a capture trigger's expression) only when the function is no more volatile
-- than what it declares. These are declared immutable, but `'user:' || some_uuid` is
-- textanycat, which is only stable (it calls the uuid's output function by type), so
-- none of them was inlined: every call ran as a separate SQL function, planned again in
-- each transaction on PostgreSQL 15-17. In the capture trigger that was the largest part
-- of the event log's cost to a writer (docs/decisions.md, "The event log"), and every row
-- an RLS policy checked paid it too. `uuid::text` is immutable, so the same expressions
-- written with the cast inline; the keys are the same strings. (intake_visibility_keys
-- reads sessions, a subquery PostgreSQL never inlines; intakes have no events.)

create or replace function public.assignment_visibility_keys(a public.session_assignments) returns text[]
language sql immutable as $$
  select array_remove(array[
    'admin',
    'user:' || a.customer_id::text,
    case when a.status = 'queued' then coalesce('pool:workshop:' || a.workshop_id::text, 'pool:general') end,
    case when a.status = 'offered' then 'mechanic:' || a.offered_to::text end,
    case when a.mechanic_id is not null then 'mechanic:' || a.mechanic_id::text end
  ], null)
$$;

create or replace function public.session_visibility_keys(s public.sessions) returns text[]
language sql immutable as $$
  select coalesce(s.visibility_keys, array['admin', 'user:' || s.customer_id::text])
$$;

create or replace function public.owner_visibility_keys(p_owner uuid) returns text[]
language sql immutable as $$
  select array['admin', 'user:' || p_owner::text]
$$;

create or replace function public.mechanic_visibility_keys(m public.mechanics) returns text[]
language sql immutable as $$
  select array['admin', 'user:' || m.user_id::text, 'mechanic:' || m.id::text]
$$;

create or replace function public.probe_visibility_keys(p public.probe_pings) returns text[]
language sql immutable as $$
  select array['user:' || p.user_id::text]
$$;
