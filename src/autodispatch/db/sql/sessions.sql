-- name: create_session
select api.create_session(
  %(type)s, %(plan)s, %(workshop_id)s,
  %(name)s, %(vehicle_year)s, %(vehicle_make)s, %(vehicle_model)s, %(concern)s
) as session_id;

-- name: sign_waiver
select api.sign_waiver(%(session_id)s, %(signed_name)s) as queued;

-- name: start_session
select api.start_session(%(session_id)s);

-- name: end_session
select api.end_session(%(session_id)s, %(cancel)s);

-- name: confirm_payment
select api.confirm_payment(%(session_id)s, %(provider)s, %(provider_ref)s, %(amount_cents)s) as confirmed;

-- name: session_pair
-- A session and its assignment read in one statement, so both come from one snapshot
-- (two statements could straddle another transaction's commit and disagree). Read
-- through row-level security: a session the caller may not see is not found.
select jsonb_build_object(
         'id', s.id, 'status', s.status, 'type', s.type, 'plan', s.plan,
         'customer_id', s.customer_id, 'workshop_id', s.workshop_id,
         'mechanic_id', s.mechanic_id, 'created_at', s.created_at, 'updated_at', s.updated_at,
         'started_at', s.started_at, 'ended_at', s.ended_at,
         'intake', to_jsonb(i) - 'customer_id'
       ) as session,
       to_jsonb(a) - 'customer_id' as assignment
from public.sessions s
join public.session_assignments a on a.session_id = s.id
left join public.intakes i on i.id = s.intake_id
where s.id = %(session_id)s;

-- name: sessions_of_caller
select s.id, s.status, s.type, s.plan, s.customer_id, s.workshop_id, s.mechanic_id,
       s.created_at, s.updated_at, s.started_at, s.ended_at
from public.sessions s
where s.customer_id = auth.uid()
   or s.mechanic_id in (select m.id from public.mechanics m where m.user_id = auth.uid())
order by s.created_at desc
limit %(limit)s;

-- name: payment_of_session
select id, session_id, status, provider, provider_ref, amount_cents, created_at, confirmed_at
from public.payments where session_id = %(session_id)s;

-- name: expire_due
select offers_returned, requests_expired
from api.expire_due(make_interval(secs => %(request_ttl_seconds)s));
