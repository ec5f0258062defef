-- name: assignment_by_id
select a.id, a.session_id, a.status, a.workshop_id, a.mechanic_id, a.mechanic_name, a.offered_to,
       a.offer_expires_at, a.request_summary, a.queued_at, a.accepted_at, a.ended_at,
       a.created_at, a.updated_at
from public.session_assignments a
where a.id = %(assignment_id)s;

-- name: open_queue
-- The requests the caller may take, oldest first. Row-level security narrows this to
-- what the caller may see; the status filter keeps only what can still be taken. An
-- offer past its expiry is back in the queue whether or not the expiry task has run yet
-- (migration 0005): it is shown as queued, as api.accept_assignment treats it.
select a.id, a.session_id,
       case when l.lapsed then 'queued' else a.status end as status,
       a.workshop_id, a.mechanic_id, a.mechanic_name,
       case when l.lapsed then null else a.offered_to end as offered_to,
       case when l.lapsed then null else a.offer_expires_at end as offer_expires_at,
       a.request_summary, a.queued_at, a.accepted_at, a.ended_at, a.created_at, a.updated_at
from public.session_assignments a
cross join lateral (
  select a.status = 'offered' and a.offer_expires_at <= now() as lapsed
) l
where a.status in ('queued', 'offered')
order by a.queued_at, a.id
limit %(limit)s;

-- name: accept_assignment
select api.accept_assignment(%(assignment_id)s) as session_id;

-- name: decline_assignment
select api.decline_assignment(%(assignment_id)s) as session_id;

-- name: offer_assignment
select api.offer_assignment(%(assignment_id)s, %(mechanic_id)s, %(ttl_seconds)s) as session_id;

-- name: list_mechanics
select m.id, m.user_id, m.display_name, m.workshop_id, w.name as workshop_name
from public.mechanics m
left join public.workshops w on w.id = m.workshop_id
order by m.display_name;
