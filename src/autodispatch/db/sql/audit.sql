-- `autodispatch audit`: catalog queries and plain SQL only, so they also run on a
-- database the first version wrote (same table names, fewer pieces). autodispatch.ops.audit
-- checks that the columns a data query needs exist before it runs it.

-- name: audit_columns
-- Every column of every table in the schemas we use (to know which checks can run).
select n.nspname as schema_name, c.relname as table_name, a.attname as column_name
from pg_class c
join pg_namespace n on n.oid = c.relnamespace
join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
where c.relkind in ('r', 'p') and n.nspname in ('public', 'auth', 'realtime');

-- name: audit_functions
select n.nspname as schema_name, p.proname as function_name
from pg_proc p
join pg_namespace n on n.oid = p.pronamespace
where n.nspname in ('public', 'auth', 'api', 'realtime');

-- name: audit_revision
select version_num from public.alembic_version;

-- name: audit_status_checks
-- CHECK constraints on the status column alone of the given tables (constraints that
-- tie the status to other columns say nothing about which statuses exist).
select c.relname as table_name, con.conname as constraint_name,
       pg_get_constraintdef(con.oid) as definition
from pg_constraint con
join pg_class c on c.oid = con.conrelid
join pg_namespace n on n.oid = c.relnamespace
join pg_attribute a on a.attrelid = c.oid and a.attname = 'status'
where n.nspname = 'public' and c.relname = any(%(tables)s)
  and con.contype = 'c' and con.conkey = array[a.attnum]
order by c.relname, con.conname;

-- name: audit_status_types
-- The status column's type, and its labels when it is an enum.
select c.relname as table_name, format_type(a.atttypid, a.atttypmod) as type_name,
       array(select e.enumlabel::text from pg_enum e
             where e.enumtypid = a.atttypid order by e.enumsortorder) as enum_labels
from pg_attribute a
join pg_class c on c.oid = a.attrelid
join pg_namespace n on n.oid = c.relnamespace
where n.nspname = 'public' and c.relname = any(%(tables)s)
  and a.attname = 'status' and not a.attisdropped;

-- name: audit_transitions
select entity, from_status, to_status from public.lifecycle_transitions;

-- name: audit_triggers
-- User triggers (constraint triggers included) with the function each one runs.
-- tgenabled: 'O' fires normally, 'A' always, 'R' only as a replica, 'D' never.
select n.nspname as schema_name, c.relname as table_name, t.tgname as trigger_name,
       t.tgenabled::text as enabled, pn.nspname as function_schema, p.proname as function_name,
       t.tgdeferrable as deferrable, t.tginitdeferred as initially_deferred
from pg_trigger t
join pg_class c on c.oid = t.tgrelid
join pg_namespace n on n.oid = c.relnamespace
join pg_proc p on p.oid = t.tgfoid
join pg_namespace pn on pn.oid = p.pronamespace
where not t.tgisinternal and n.nspname in ('public', 'realtime', 'auth');

-- name: audit_row_security
-- Each public table: row-level security on, and whether the API's roles can read it (a
-- grant to them or to PUBLIC, on the table or any column; a role that does not exist
-- reads nothing).
select c.relname as table_name, c.relrowsecurity as enabled,
       coalesce(has_any_column_privilege((select oid from pg_roles where rolname = 'anon'),
                                         c.oid, 'SELECT'), false)
       or coalesce(has_any_column_privilege((select oid from pg_roles where rolname = 'authenticated'),
                                            c.oid, 'SELECT'), false) as api_readable
from pg_class c
join pg_namespace n on n.oid = c.relnamespace
where n.nspname = 'public' and c.relkind in ('r', 'p')
order by c.relname;

-- name: audit_policies
select tablename as table_name, policyname as policy_name, permissive, roles::text[] as roles,
       cmd, qual, with_check
from pg_policies
where schemaname = 'public'
order by tablename, policyname;

-- name: audit_write_grants
-- Write privileges on public tables held by the API's roles or by everyone (PUBLIC).
select c.relname as "table", coalesce(r.rolname, 'PUBLIC') as grantee,
       acl.privilege_type
from pg_class c
join pg_namespace n on n.oid = c.relnamespace
cross join lateral aclexplode(c.relacl) acl
left join pg_roles r on r.oid = acl.grantee
where n.nspname = 'public' and c.relkind in ('r', 'p')
  and acl.privilege_type in ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')
  and (acl.grantee = 0 or r.rolname in ('anon', 'authenticated'))
order by c.relname, grantee, acl.privilege_type;

-- name: audit_pair_counts
-- How many sessions have each (session status, assignment status) pair.
select s.status as session_status, a.status as assignment_status, count(*)::int as n
from public.sessions s
join public.session_assignments a on a.session_id = s.id
group by s.status, a.status;

-- name: audit_pairs_rows
-- The sessions whose pair is one of the given ones.
select s.id as session_id, a.id as assignment_id,
       s.status as session_status, a.status as assignment_status
from public.sessions s
join public.session_assignments a on a.session_id = s.id
where exists (select 1 from unnest(%(session_statuses)s::text[], %(assignment_statuses)s::text[])
                as p(session_status, assignment_status)
              where p.session_status is not distinct from s.status
                and p.assignment_status is not distinct from a.status)
order by s.id
limit %(limit)s;

-- name: audit_sessions_without_assignment
select s.id as session_id, s.status as session_status, count(*) over ()::int as total
from public.sessions s
where not exists (select 1 from public.session_assignments a where a.session_id = s.id)
order by s.id
limit %(limit)s;

-- name: audit_unknown_session_statuses
select s.id as session_id, s.status as session_status, count(*) over ()::int as total
from public.sessions s
where s.status is null or not (s.status = any(%(statuses)s::text[]))
order by s.id
limit %(limit)s;

-- name: audit_unknown_assignment_statuses
select a.id as assignment_id, a.session_id, a.status as assignment_status,
       count(*) over ()::int as total
from public.session_assignments a
where a.status is null or not (a.status = any(%(statuses)s::text[]))
order by a.id
limit %(limit)s;

-- name: audit_offers_past_expiry
select a.id as assignment_id, a.session_id, a.offered_to, a.offer_expires_at,
       count(*) over ()::int as total
from public.session_assignments a
where a.status = 'offered'
  and a.offer_expires_at < now() - make_interval(secs => %(grace_seconds)s::int)
order by a.offer_expires_at, a.id
limit %(limit)s;

-- name: audit_requests_past_ttl
select a.id as assignment_id, a.session_id, a.queued_at, count(*) over ()::int as total
from public.session_assignments a
where a.status = 'queued'
  and a.queued_at < now() - make_interval(secs => %(request_ttl_seconds)s::int + %(grace_seconds)s::int)
order by a.queued_at, a.id
limit %(limit)s;

-- name: audit_stale_session_keys
-- Sessions whose stored visibility keys are not their assignment's (row-level security
-- and the realtime router read them: the wrong people see the session, or the right
-- ones do not).
select s.id as session_id, a.id as assignment_id, count(*) over ()::int as total
from public.sessions s
join public.session_assignments a on a.session_id = s.id
where s.visibility_keys is distinct from public.assignment_visibility_keys(a)
order by s.id
limit %(limit)s;

-- name: audit_stream
select last_id, pruned_through,
       (select max(id) from realtime.events) as max_event_id,
       (select extract(epoch from clock_timestamp() - max(at))::float8
        from realtime.events where id is not null) as newest_age_seconds,
       (select extract(epoch from clock_timestamp() - min(at))::float8
        from realtime.events where id is not null) as oldest_age_seconds
from realtime.stream
where id = 1;

-- name: audit_events_without_id
-- Events committed more than %(grace)s seconds ago (by their write time) that have no id
-- yet: no server is giving ids (realtime/sequencer.py), so no reader sees them.
select seq, table_name, type, row_id, at, count(*) over ()::int as total
from realtime.events
where id is null and at < now() - make_interval(secs => %(grace)s)
order by seq
limit %(limit)s;

-- name: audit_gateways
-- Each gateway's heartbeat, whether it is live (the rule every process's gauge uses too,
-- migration 0004), and the first event it had not routed when it last beat.
select g.id, g.host, g.pid, g.version, g.started_at, g.seen_at, g.heartbeat_seconds,
       g.position, g.subscribers, realtime.gateway_is_live(g) as live,
       extract(epoch from now() - g.seen_at)::float8 as silent_seconds,
       e.id as next_event_id,
       greatest(extract(epoch from g.seen_at - e.at)::float8, 0) as lag_seconds,
       extract(epoch from clock_timestamp() - e.at)::float8 as next_event_age_seconds
from realtime.gateways g
left join lateral (
  select ev.id, ev.at from realtime.events ev where ev.id > g.position order by ev.id limit 1
) e on true
order by g.started_at, g.id;

-- name: audit_push_cursor
-- How far the Web Push sender got (migration 0003) against the head of the log: events
-- not pushed yet, and how long ago the first of them committed.
select c.last_id as push_position, s.last_id as stream_last_id,
       greatest(s.last_id - c.last_id, 0) as behind,
       coalesce((select extract(epoch from clock_timestamp() - e.at)::float8
                 from realtime.events e where e.id > c.last_id order by e.id limit 1), 0)
         as lag_seconds
from realtime.push_cursor c
cross join realtime.stream s
where c.id = 1 and s.id = 1;
