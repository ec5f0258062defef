-- The api.* functions of dispatch: the only way the API changes a request. Each checks who
-- is calling (api.caller), locks the session row first (one lock order everywhere, so
-- writers never deadlock), says why it moves (api.because, written to lifecycle_audit),
-- and raises when nothing changed instead of reporting success. They run as the owner
-- (security definer, empty search_path); the API's role may call only those granted to
-- authenticated at the end of this file. The moves themselves, and what each sets off, are
-- the triggers' of 20_requests_and_lifecycles.sql.
--
-- One file of ~440 lines on purpose: every function that moves a request, in lifecycle
-- order, beside the helpers they share; each must take the same lock order and give its
-- reasons the same way, which is easiest to check with all of them in view.

-- ---------------------------------------------------------------------------
-- Helpers
-- ---------------------------------------------------------------------------

create function api.fail(p_status int, p_code text, p_message text) returns void
language plpgsql as $$
begin
  raise exception using errcode = 'AD' || p_status::text, hint = p_code, message = p_message;
end
$$;

create function api.caller(p_allowed text[]) returns public.profiles
language plpgsql stable security definer set search_path = '' as $$
declare
  v_profile public.profiles;
begin
  if auth.uid() is null then
    perform api.fail(401, 'not_authenticated', 'sign in first');
  end if;
  select * into v_profile from public.profiles where id = auth.uid();
  if not found then
    perform api.fail(401, 'not_authenticated', 'this account no longer exists; sign in again');
  end if;
  if not v_profile.account_type = any (p_allowed) then
    perform api.fail(403, 'wrong_role', format('only %s accounts may do this; you are signed in as a %s',
                                               array_to_string(p_allowed, ' or '), v_profile.account_type));
  end if;
  return v_profile;
end
$$;

create function api.because(p_reason text) returns void
language sql as $$
  select set_config('autodispatch.reason', p_reason, true);
$$;

-- Lock the session row (always the first lock a writer takes, so writers never
-- deadlock); 404 if the caller may not see it.
create function api.lock_session(p_session_id uuid) returns public.sessions
language plpgsql security definer set search_path = '' as $$
declare
  v_session public.sessions;
begin
  select * into v_session from public.sessions where id = p_session_id for update;
  if not found or not (public.session_visibility_keys(v_session) && auth.principal_keys()) then
    perform api.fail(404, 'session_not_found', format('no session %s that you may see', p_session_id));
  end if;
  return v_session;
end
$$;

-- ---------------------------------------------------------------------------
-- A customer's request: create it, sign the waiver, pay.
-- ---------------------------------------------------------------------------

create function api.create_session(
  p_type text, p_plan text, p_workshop_id uuid,
  p_name text, p_vehicle_year int, p_vehicle_make text, p_vehicle_model text, p_concern text
) returns uuid
language plpgsql security definer set search_path = '' as $$
declare
  v_customer public.profiles := api.caller(array['customer']);
  v_intake_id uuid;
  v_session_id uuid;
begin
  if p_workshop_id is not null and not exists (select 1 from public.workshops where id = p_workshop_id) then
    perform api.fail(422, 'unknown_workshop',
                     format('workshop_id %s is not a workshop; pick one from GET /api/workshops', p_workshop_id));
  end if;
  perform api.because('customer requested a session');
  insert into public.intakes (customer_id, name, vehicle_year, vehicle_make, vehicle_model, concern)
  values (v_customer.id, btrim(p_name), p_vehicle_year, btrim(p_vehicle_make), btrim(p_vehicle_model), btrim(p_concern))
  returning id into v_intake_id;
  insert into public.sessions (customer_id, intake_id, type, plan, workshop_id)
  values (v_customer.id, v_intake_id, p_type, p_plan, p_workshop_id)
  returning id into v_session_id;
  if p_type = 'paid' then
    insert into public.payments (session_id, customer_id) values (v_session_id, v_customer.id);
  end if;
  return v_session_id;
end
$$;

-- Queue the request once the waiver is signed and, for a paid session, paid.
create function api.queue_if_ready(p_session_id uuid) returns boolean
language plpgsql security definer set search_path = '' as $$
declare
  v_session public.sessions;
begin
  select * into v_session from public.sessions where id = p_session_id;
  if not exists (select 1 from public.waivers where session_id = p_session_id) then
    return false;
  end if;
  if v_session.type = 'paid' and not exists (
    select 1 from public.payments where session_id = p_session_id and status = 'confirmed'
  ) then
    return false;
  end if;
  update public.session_assignments set status = 'queued', queued_at = now()
  where session_id = p_session_id and status = 'pending_waiver';
  return found;
end
$$;

create function api.sign_waiver(p_session_id uuid, p_signed_name text) returns boolean
language plpgsql security definer set search_path = '' as $$
declare
  v_customer public.profiles := api.caller(array['customer']);
  v_session public.sessions;
  v_assignment public.session_assignments;
begin
  v_session := api.lock_session(p_session_id);
  select * into v_assignment from public.session_assignments where session_id = p_session_id for update;
  if v_session.customer_id <> v_customer.id then
    perform api.fail(403, 'not_your_session', 'only the customer who requested this session may sign its waiver');
  end if;
  if exists (select 1 from public.waivers where session_id = p_session_id) then
    perform api.fail(409, 'waiver_already_signed', 'the waiver for this session is already signed');
  end if;
  if v_session.status <> 'pending' or v_assignment.status <> 'pending_waiver' then
    perform api.fail(409, 'invalid_state',
                     format('a waiver can only be signed for a pending session; this one is %L', v_session.status));
  end if;
  perform api.because('customer signed the waiver');
  insert into public.waivers (session_id, customer_id, signed_name)
  values (p_session_id, v_customer.id, btrim(p_signed_name));
  return api.queue_if_ready(p_session_id);
end
$$;

-- Called by the payment webhook (as the service, not as a user). Idempotent:
-- returns false when the payment was already confirmed.
create function api.confirm_payment(p_session_id uuid, p_provider text, p_ref text, p_amount_cents int)
returns boolean
language plpgsql security definer set search_path = '' as $$
declare
  v_payment public.payments;
begin
  perform 1 from public.sessions where id = p_session_id for update;
  if not found then
    perform api.fail(404, 'session_not_found', format('no session %s', p_session_id));
  end if;
  select * into v_payment from public.payments where session_id = p_session_id for update;
  if not found then
    perform api.fail(409, 'not_paid_session', format('session %s is free; it takes no payment', p_session_id));
  end if;
  if v_payment.status = 'confirmed' then
    return false;
  end if;
  perform api.because('payment confirmed');
  update public.payments
  set status = 'confirmed', provider = p_provider, provider_ref = p_ref,
      amount_cents = p_amount_cents, confirmed_at = now()
  where id = v_payment.id;
  perform api.queue_if_ready(p_session_id);
  return true;
end
$$;

-- ---------------------------------------------------------------------------
-- Offers and acceptance
--
-- api.expire_due (below) returns offers past offer_expires_at to the queue, but only when
-- a server runs it (about every 0.5 s); until then the row still says 'offered'. So
-- accept, decline and offer first see the offer as expire_due would leave it:
--
-- - accept settles the lapsed offer exactly as expire_due does (offered -> queued, reason
--   'offer expired', one audit row and one event), then accepts the queued request like
--   any other: the mechanic it was offered to, or any other mechanic of its pool, may
--   take it, first come first served;
-- - decline by the mechanic it was offered to is refused (409 not_offered_to_you, the
--   code the same call gets once the task has run): there is no offer left to decline;
-- - an admin may offer it again (it is settled first, then offered).
--
-- The queue read (open_queue in db/sql/assignments.sql) shows such a row as queued.
-- ---------------------------------------------------------------------------

-- The offer lapsed: settle it as api.expire_due does. Called with the session and the
-- assignment locked; returns the assignment as it is now.
create function api.settle_lapsed_offer(p_assignment public.session_assignments)
returns public.session_assignments
language plpgsql security definer set search_path = '' as $$
declare
  v_assignment public.session_assignments := p_assignment;
begin
  if v_assignment.status = 'offered' and v_assignment.offer_expires_at <= now() then
    perform api.because('offer expired');
    update public.session_assignments set status = 'queued'
    where id = v_assignment.id
    returning * into v_assignment;
  end if;
  return v_assignment;
end
$$;

create function api.accept_assignment(p_assignment_id uuid) returns uuid
language plpgsql security definer set search_path = '' as $$
declare
  v_profile public.profiles := api.caller(array['mechanic']);
  v_mechanic public.mechanics;
  v_session_id uuid;
  v_assignment public.session_assignments;
begin
  select * into v_mechanic from public.mechanics where user_id = v_profile.id;
  if not found then
    perform api.fail(403, 'not_a_mechanic', 'this account has no mechanic record; ask an admin to set one up');
  end if;
  select session_id into v_session_id from public.session_assignments where id = p_assignment_id;
  -- Lock order: session, then assignment. Concurrent accepts queue up here and each
  -- re-reads the assignment after the previous one commits: exactly one wins.
  perform 1 from public.sessions where id = v_session_id for update;
  select * into v_assignment from public.session_assignments where id = p_assignment_id for update;
  if not found or (v_assignment.workshop_id is not null
                   and v_assignment.workshop_id is distinct from v_mechanic.workshop_id) then
    perform api.fail(404, 'assignment_not_found', format('no request %s that you may take', p_assignment_id));
  end if;
  -- An offer past its expiry is back in the queue, whether or not the task has run.
  v_assignment := api.settle_lapsed_offer(v_assignment);
  if v_assignment.status = 'accepted' and v_assignment.mechanic_id = v_mechanic.id then
    perform api.fail(409, 'already_accepted', 'you already accepted this request');
  elsif v_assignment.status = 'accepted' then
    perform api.fail(409, 'already_taken', 'another mechanic took this request');
  elsif v_assignment.status = 'offered' and v_assignment.offered_to <> v_mechanic.id then
    perform api.fail(409, 'offered_to_another', 'this request is offered to another mechanic right now');
  elsif v_assignment.status not in ('queued', 'offered') then
    perform api.fail(409, 'not_available', format('this request is %s and can no longer be taken',
                                                  v_assignment.status));
  end if;
  perform api.because('mechanic accepted');
  update public.session_assignments
  set status = 'accepted', mechanic_id = v_mechanic.id, mechanic_name = v_mechanic.display_name,
      accepted_at = now()
  where id = p_assignment_id;
  return v_session_id;
end
$$;

create function api.decline_assignment(p_assignment_id uuid) returns uuid
language plpgsql security definer set search_path = '' as $$
declare
  v_profile public.profiles := api.caller(array['mechanic']);
  v_mechanic public.mechanics;
  v_assignment public.session_assignments;
begin
  select * into v_mechanic from public.mechanics where user_id = v_profile.id;
  select * into v_assignment from public.session_assignments where id = p_assignment_id;
  if not found or not (public.assignment_visibility_keys(v_assignment) && auth.principal_keys()) then
    perform api.fail(404, 'assignment_not_found', format('no request %s that you may see', p_assignment_id));
  end if;
  perform 1 from public.sessions where id = v_assignment.session_id for update;
  select * into v_assignment from public.session_assignments where id = p_assignment_id for update;
  if v_assignment.status = 'offered' and v_assignment.offer_expires_at <= now() then
    -- The same code as once the expiry task has run (the request is then queued).
    perform api.fail(409, 'not_offered_to_you',
                     format('this offer expired at %s and the request is back in the queue;'
                            ' only an open offer made to you can be declined',
                            v_assignment.offer_expires_at));
  end if;
  if v_assignment.status <> 'offered' or v_assignment.offered_to is distinct from v_mechanic.id then
    perform api.fail(409, 'not_offered_to_you',
                     format('only an offer made to you can be declined; this request is %s', v_assignment.status));
  end if;
  perform api.because('mechanic declined the offer');
  update public.session_assignments set status = 'queued' where id = p_assignment_id;
  return v_assignment.session_id;
end
$$;

create function api.offer_assignment(p_assignment_id uuid, p_mechanic_id uuid, p_ttl_seconds int)
returns uuid
language plpgsql security definer set search_path = '' as $$
declare
  v_admin public.profiles := api.caller(array['admin']);
  v_mechanic public.mechanics;
  v_assignment public.session_assignments;
begin
  if p_ttl_seconds is null or p_ttl_seconds not between 5 and 86400 then
    perform api.fail(422, 'invalid_ttl', format('ttl_seconds must be from 5 to 86400, not %s', p_ttl_seconds));
  end if;
  select * into v_mechanic from public.mechanics where id = p_mechanic_id;
  if not found then
    perform api.fail(422, 'unknown_mechanic', format('mechanic_id %s is not a mechanic', p_mechanic_id));
  end if;
  select * into v_assignment from public.session_assignments where id = p_assignment_id;
  if not found then
    perform api.fail(404, 'assignment_not_found', format('no request %s', p_assignment_id));
  end if;
  perform 1 from public.sessions where id = v_assignment.session_id for update;
  select * into v_assignment from public.session_assignments where id = p_assignment_id for update;
  if v_assignment.workshop_id is not null and v_assignment.workshop_id is distinct from v_mechanic.workshop_id then
    perform api.fail(422, 'mechanic_not_eligible',
                     'this request belongs to a workshop; offer it to one of that workshop''s mechanics');
  end if;
  -- An offer past its expiry is back in the queue: it may be offered again.
  v_assignment := api.settle_lapsed_offer(v_assignment);
  if v_assignment.status <> 'queued' then
    perform api.fail(409, 'not_queued', format('only a queued request can be offered; this one is %s',
                                               v_assignment.status));
  end if;
  perform api.because(format('admin offered to mechanic %s for %s s', p_mechanic_id, p_ttl_seconds));
  update public.session_assignments
  set status = 'offered', offered_to = p_mechanic_id,
      offer_expires_at = now() + make_interval(secs => p_ttl_seconds)
  where id = p_assignment_id;
  return v_assignment.session_id;
end
$$;

-- ---------------------------------------------------------------------------
-- The session itself: start and end.
-- ---------------------------------------------------------------------------

create function api.start_session(p_session_id uuid) returns void
language plpgsql security definer set search_path = '' as $$
declare
  v_profile public.profiles := api.caller(array['customer', 'mechanic', 'admin']);
  v_session public.sessions;
  v_assignment public.session_assignments;
begin
  v_session := api.lock_session(p_session_id);
  select * into v_assignment from public.session_assignments where session_id = p_session_id for update;
  if v_profile.account_type = 'customer' and v_session.customer_id <> v_profile.id
     or v_profile.account_type = 'mechanic' and v_session.mechanic_id is distinct from
        (select id from public.mechanics where user_id = v_profile.id) then
    perform api.fail(403, 'not_a_participant', 'only the customer and the accepted mechanic may start this session');
  end if;
  if v_session.status <> 'waiting' then
    perform api.fail(409, 'invalid_state', format('only a session waiting for its start can start; this one is %L',
                                                  v_session.status));
  end if;
  perform api.because(v_profile.account_type || ' started the session');
  update public.sessions set status = 'live', started_at = now() where id = p_session_id;
end
$$;

-- End by either party: a live session completes, one that never went live is cancelled.
-- What the database does then, trigger by trigger: the top of 20_requests_and_lifecycles.sql.
create function api.end_session(p_session_id uuid, p_cancel boolean) returns void
language plpgsql security definer set search_path = '' as $$
declare
  v_profile public.profiles := api.caller(array['customer', 'mechanic', 'admin']);
  v_session public.sessions;
  v_assignment public.session_assignments;
  v_target text;
begin
  v_session := api.lock_session(p_session_id);
  select * into v_assignment from public.session_assignments where session_id = p_session_id for update;
  if v_profile.account_type = 'customer' and v_session.customer_id <> v_profile.id
     or v_profile.account_type = 'mechanic' and v_session.mechanic_id is distinct from
        (select id from public.mechanics where user_id = v_profile.id) then
    perform api.fail(403, 'not_a_participant',
                     'only the customer and the accepted mechanic may end or cancel this session');
  end if;
  if v_session.status in ('completed', 'cancelled') then
    perform api.fail(409, 'already_ended', format('this session already ended (%s)', v_session.status));
  end if;
  v_target := case when p_cancel or v_session.status <> 'live' then 'cancelled' else 'completed' end;
  perform api.because(v_profile.account_type || case when p_cancel then ' cancelled' else ' ended' end
                      || ' the session');
  update public.sessions set status = v_target, ended_at = now() where id = p_session_id;
end
$$;

-- ---------------------------------------------------------------------------
-- Admin and background work
-- ---------------------------------------------------------------------------

create function api.set_feature_flag(p_key text, p_enabled boolean) returns void
language plpgsql security definer set search_path = '' as $$
declare
  v_admin public.profiles := api.caller(array['admin']);
begin
  update public.feature_flags set enabled = p_enabled, updated_at = now(), updated_by = v_admin.id
  where key = p_key;
  if not found then
    perform api.fail(404, 'unknown_flag', format('there is no feature flag %L; GET /api/feature-flags lists them', p_key));
  end if;
end
$$;

-- Background work (run by the server as the service): offers past their time go back
-- to the queue; requests nobody took within p_request_ttl expire.
create function api.expire_due(p_request_ttl interval, out offers_returned int, out requests_expired int)
language plpgsql security definer set search_path = '' as $$
declare
  v_id uuid;
begin
  offers_returned := 0;
  requests_expired := 0;
  perform api.because('offer expired');
  for v_id in
    select a.session_id from public.session_assignments a
    where a.status = 'offered' and a.offer_expires_at <= now()
  loop
    perform 1 from public.sessions where id = v_id for update skip locked;
    if found then
      update public.session_assignments set status = 'queued'
      where session_id = v_id and status = 'offered' and offer_expires_at <= now();
      if found then offers_returned := offers_returned + 1; end if;
    end if;
  end loop;
  perform api.because('nobody accepted in time');
  for v_id in
    select a.session_id from public.session_assignments a
    where a.status = 'queued' and a.queued_at <= now() - p_request_ttl
  loop
    perform 1 from public.sessions where id = v_id for update skip locked;
    if found then
      update public.session_assignments set status = 'expired', ended_at = now()
      where session_id = v_id and status = 'queued' and queued_at <= now() - p_request_ttl;
      if found then requests_expired := requests_expired + 1; end if;
    end if;
  end loop;
end
$$;

-- No api function is executable by PUBLIC (a new function is, unless revoked): the
-- helpers and the service's functions (confirm_payment, expire_due) run only inside the
-- others or as the owner; a signed-in user may call these.
revoke execute on all functions in schema api from public;
grant execute on function
  api.create_session(text, text, uuid, text, int, text, text, text),
  api.sign_waiver(uuid, text),
  api.accept_assignment(uuid),
  api.decline_assignment(uuid),
  api.offer_assignment(uuid, uuid, int),
  api.start_session(uuid),
  api.end_session(uuid, boolean),
  api.set_feature_flag(text, boolean)
to authenticated;
