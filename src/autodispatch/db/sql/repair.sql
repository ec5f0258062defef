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
-- Table rows with events committed without an id (the commit trigger was bypassed), in
-- the order of their first such event: those events (seqs), whether any of them saw a
-- version before it (an old record: someone may have seen that version), and the row's
-- latest event overall (one of them, or a later one that got an id and was delivered).
-- head: the stream's last id in this same snapshot, so the repair can tell whether the
-- row changed after this read (any later event has a higher id).
with stuck as (
  select table_name, row_id, min(seq) as first_seq, count(*)::int as events,
         array_agg(seq order by seq) as seqs, bool_or(old_record is not null) as saw_before
  from realtime.events
  where id is null
  group by table_name, row_id
), page as (
  select s.*, (sum(s.events) over ())::int as total
  from stuck s
  where s.first_seq > %(after)s
  order by s.first_seq
  limit %(limit)s
)
select p.table_name, p.row_id, p.first_seq, p.events, p.seqs, p.saw_before, p.total,
       l.seq as latest_seq, l.id as latest_id,
       (select last_id from realtime.stream where id = 1) as head
from page p
cross join lateral (
  select e.seq, e.id from realtime.events e
  where e.table_name = p.table_name and e.row_id = p.row_id
  order by e.seq desc
  limit 1
) l
order by p.first_seq;

-- name: repair_lock_stream
-- The lock every commit takes to get its event ids (realtime.assign_id, migration 0002),
-- taken first: until this transaction commits no other event gets an id, so the row
-- versions read below stay the latest and the id given here follows every delivered one.
select last_id from realtime.stream where id = 1 for update;

-- name: repair_rows_changed_since
-- Rows (of the given ones) with an event committed after the page was read.
select distinct e.table_name, e.row_id
from realtime.events e
where e.id > %(head)s
  and (e.table_name, e.row_id) in (select * from unnest(%(tables)s::text[], %(row_ids)s::text[]));

-- name: repair_lock_events
select seq from realtime.events where seq = any(%(seqs)s::bigint[]) and id is null
order by seq
for update;

-- name: repair_drop_events
delete from realtime.events where seq = any(%(seqs)s::bigint[]) and id is null;

-- name: repair_rewrite_event
-- The one event that stands for all of a row's events without an id (seqs): the row as
-- of its latest event (latest_seq: the last of them, or a later delivered one), seen from
-- the version subscribers last saw (the oldest old record among them), with the old keys
-- of every one of them, so whoever could see any version the dropped events changed gets
-- the change, or the removal when the row left their view.
with stuck as (
  select (array_agg(e.old_record order by e.seq) filter (where e.old_record is not null))[1]
           as old_record,
         array(select distinct k
               from realtime.events x, unnest(x.old_keys) k
               where x.seq = any(%(seqs)s::bigint[])
               order by k) as old_keys
  from realtime.events e
  where e.seq = any(%(seqs)s::bigint[])
)
update realtime.events t
set record = l.record,
    new_keys = l.new_keys,
    old_record = stuck.old_record,
    old_keys = stuck.old_keys,
    type = case when l.record is null then 'DELETE'
                when stuck.old_record is null then 'INSERT'
                else 'UPDATE' end
from stuck, realtime.events l
where t.seq = %(seq)s and t.id is null and l.seq = %(latest_seq)s
returning t.seq;

-- name: repair_assign_event_id
-- Like realtime.assign_id (migration 0002): the next offset under the stream's row lock
-- (which this transaction already holds), then a wake-up for the readers.
with next as (
  update realtime.stream set last_id = last_id + 1 where id = 1 returning last_id
)
update realtime.events e set id = next.last_id, at = clock_timestamp()
from next
where e.seq = %(seq)s and e.id is null
returning e.id;

-- name: repair_notify_readers
select pg_notify('autodispatch_events', '');

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
