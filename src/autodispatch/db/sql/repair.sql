-- `autodispatch repair`: the rows each repair visits (in pages: keyset on the id, so a
-- run ends even when some rows cannot be fixed) and the changes it makes. The reason of
-- every transition it causes is 'repair' (lifecycle_audit.reason).

-- name: repair_because
select set_config('autodispatch.reason', 'repair', true);

-- name: repair_lifecycle_triggers
-- The lifecycle triggers as they are now (enabled: 'O' or 'A').
select c.relname as table_name, t.tgname as trigger_name, t.tgenabled::text as enabled
from pg_trigger t
join pg_class c on c.oid = t.tgrelid
join pg_namespace n on n.oid = c.relnamespace
where n.nspname = 'public' and c.relname in ('sessions', 'session_assignments')
  and not t.tgisinternal;

-- name: repair_sessions_without_assignment
select s.id as session_id, s.status as session_status, s.mechanic_id,
       (exists (select 1 from public.waivers w where w.session_id = s.id)
        and (s.type = 'free' or exists (select 1 from public.payments p
                                        where p.session_id = s.id and p.status = 'confirmed')))
         as ready_to_queue,
       count(*) over ()::int as total
from public.sessions s
where not exists (select 1 from public.session_assignments a where a.session_id = s.id)
  and s.id > %(after)s
order by s.id
limit %(limit)s;

-- name: repair_insert_assignment
-- The missing assignment, straight in the status it should have (the guard, which
-- insists on 'pending_waiver' for a new assignment, is off in this transaction).
insert into public.session_assignments
  (session_id, customer_id, workshop_id, request_summary, status, mechanic_id, mechanic_name,
   queued_at, accepted_at, ended_at)
select s.id, s.customer_id, s.workshop_id, public.build_request_summary(s), %(status)s::text,
       case when %(status)s::text in ('accepted', 'completed') then s.mechanic_id end,
       case when %(status)s::text in ('accepted', 'completed')
            then (select m.display_name from public.mechanics m where m.id = s.mechanic_id) end,
       case when %(status)s::text in ('queued', 'accepted', 'completed') then now() end,
       case when %(status)s::text in ('accepted', 'completed') then now() end,
       case when %(status)s::text in ('completed', 'cancelled', 'expired')
            then coalesce(s.ended_at, now()) end
from public.sessions s
where s.id = %(session_id)s
  and not exists (select 1 from public.session_assignments a where a.session_id = s.id);

-- name: repair_inconsistent_pairs
-- Sessions whose pair is not one of the consistent ones (both statuses known).
select s.id as session_id, a.id as assignment_id,
       s.status as session_status, a.status as assignment_status,
       coalesce(a.mechanic_id, s.mechanic_id) as mechanic_id,
       count(*) over ()::int as total
from public.sessions s
join public.session_assignments a on a.session_id = s.id
where s.status = any(%(session_states)s::text[])
  and a.status = any(%(assignment_states)s::text[])
  and not exists (select 1 from unnest(%(consistent_sessions)s::text[], %(consistent_assignments)s::text[])
                    as p(session_status, assignment_status)
                  where p.session_status = s.status and p.assignment_status = a.status)
  and s.id > %(after)s
order by s.id
limit %(limit)s;

-- name: repair_lock_session
-- Lock order: the session first, as every writer does. SKIP LOCKED: a repair never waits
-- for a row a writer holds (it leaves the row for the next run), so it cannot be part of
-- a deadlock. The row as it is now (FOR UPDATE reads the latest committed version).
select id, status, mechanic_id from public.sessions where id = %(session_id)s
for update skip locked;

-- name: repair_lock_assignment
-- Then its assignment, the same way.
select id, status, mechanic_id from public.session_assignments
where session_id = %(session_id)s
for update skip locked;

-- name: repair_pair_exists
-- Unlocked: whether a row the locks skipped exists (busy) or not (gone, or never made).
select exists (select 1 from public.sessions where id = %(session_id)s) as session,
       exists (select 1 from public.session_assignments where session_id = %(session_id)s)
         as assignment;

-- name: repair_set_assignment
-- With the guard off: set what the guard would have (updated_at, a cleared offer).
update public.session_assignments a
set status = %(status)s::text,
    mechanic_id = case when %(status)s::text in ('accepted', 'completed')
                       then coalesce(a.mechanic_id, %(mechanic_id)s::uuid) else a.mechanic_id end,
    mechanic_name = case when %(status)s::text in ('accepted', 'completed')
                         then coalesce(a.mechanic_name,
                                       (select m.display_name from public.mechanics m
                                        where m.id = coalesce(a.mechanic_id, %(mechanic_id)s::uuid)))
                         else a.mechanic_name end,
    offered_to = case when %(status)s::text = 'offered' then a.offered_to end,
    offer_expires_at = case when %(status)s::text = 'offered' then a.offer_expires_at end,
    accepted_at = case when %(status)s::text in ('accepted', 'completed')
                       then coalesce(a.accepted_at, now()) else a.accepted_at end,
    ended_at = case when %(status)s::text in ('completed', 'cancelled', 'expired')
                    then coalesce(a.ended_at, now()) else a.ended_at end,
    updated_at = now()
where a.id = %(assignment_id)s and a.status = %(from_status)s::text;

-- name: repair_set_session
update public.sessions s
set status = %(status)s::text,
    mechanic_id = case when %(status)s::text in ('waiting', 'live', 'completed')
                       then coalesce(s.mechanic_id, %(mechanic_id)s::uuid)
                       when %(status)s::text = 'pending' then null
                       else s.mechanic_id end,
    ended_at = case when %(status)s::text in ('completed', 'cancelled')
                    then coalesce(s.ended_at, now()) else s.ended_at end,
    updated_at = now()
where s.id = %(session_id)s and s.status = %(from_status)s::text;

-- name: repair_offers_past_expiry
select a.id as assignment_id, a.session_id, a.offered_to, count(*) over ()::int as total
from public.session_assignments a
where a.status = 'offered'
  and a.offer_expires_at < now() - make_interval(secs => %(grace_seconds)s::int)
  and a.id > %(after)s
order by a.id
limit %(limit)s;

-- name: repair_return_offer
-- An allowed move (offered -> queued): the guard clears the offer, the audit trigger
-- writes the row.
update public.session_assignments set status = 'queued'
where id = %(assignment_id)s and status = 'offered'
  and offer_expires_at < now() - make_interval(secs => %(grace_seconds)s::int);

-- name: repair_requests_past_ttl
select a.id as assignment_id, a.session_id, a.queued_at, count(*) over ()::int as total
from public.session_assignments a
where a.status = 'queued'
  and a.queued_at < now() - make_interval(secs => %(request_ttl_seconds)s::int + %(grace_seconds)s::int)
  and a.id > %(after)s
order by a.id
limit %(limit)s;

-- name: repair_expire_request
-- An allowed move (queued -> expired); the sync trigger cancels the session.
update public.session_assignments set status = 'expired', ended_at = now()
where id = %(assignment_id)s and status = 'queued'
  and queued_at < now() - make_interval(secs => %(request_ttl_seconds)s::int + %(grace_seconds)s::int);

-- name: repair_stale_session_keys
select s.id as session_id, s.status as session_status, count(*) over ()::int as total
from public.sessions s
join public.session_assignments a on a.session_id = s.id
where s.visibility_keys is distinct from public.assignment_visibility_keys(a)
  and s.id > %(after)s
order by s.id
limit %(limit)s;

-- name: repair_refresh_session_keys
-- Touching the row runs the sessions_keys trigger, which recomputes the keys from the
-- assignment (and the change is captured for subscribers).
update public.sessions s set updated_at = now()
where s.id = %(session_id)s
  and s.visibility_keys is distinct from
      (select public.assignment_visibility_keys(a) from public.session_assignments a
       where a.session_id = s.id)
returning s.status;

-- name: repair_note
-- A repair that moved no status still leaves its trace in the lifecycle audit
-- (from = to), so every repaired row can be found by reason = 'repair'.
insert into public.lifecycle_audit (entity, entity_id, session_id, from_status, to_status, actor, reason)
values (%(entity)s, %(entity_id)s, %(session_id)s, %(status)s, %(status)s, null, 'repair');

-- name: repair_events_without_id
-- Events committed without an id for longer than a running server leaves them (none is
-- giving ids: realtime/sequencer.py), oldest first.
select seq, table_name, type, row_id, at, count(*) over ()::int as total
from realtime.events
where id is null and seq > %(after)s and at < now() - make_interval(secs => %(grace)s)
order by seq
limit %(limit)s;

-- name: repair_sequence_events
-- What a server's sequencer does: ids for the oldest committed events without one, in
-- order, after every delivered event; then one wake-up for the readers (migration 0008).
select assigned, last_id from realtime.sequence(%(limit)s);

-- name: repair_stopped_gateways
select g.id, g.host, g.pid, g.seen_at, count(*) over ()::int as total
from realtime.gateways g
where not realtime.gateway_is_live(g)
  and g.id > %(after)s
order by g.id
limit %(limit)s;

-- name: repair_forget_gateway
delete from realtime.gateways g
where g.id = %(id)s and not realtime.gateway_is_live(g);
