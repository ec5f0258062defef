-- 0005: an offer past its expiry is expired, whether or not the expiry task has run.
--
-- api.expire_due (0001) returns offers past offer_expires_at to the queue, but only when
-- a server runs it (about every 0.5 s). Until then the row still says 'offered', and
-- accept, decline and offer read it as a live offer: with no server running, an offer
-- could be accepted hours after it lapsed, and nobody else could take the request. Now
-- each of them first sees the offer as expire_due would leave it:
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

create or replace function api.accept_assignment(p_assignment_id uuid) returns uuid
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

create or replace function api.decline_assignment(p_assignment_id uuid) returns uuid
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

create or replace function api.offer_assignment(p_assignment_id uuid, p_mechanic_id uuid, p_ttl_seconds int)
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

-- Only the api.* functions above call it (they run as its owner); no role may.
revoke execute on function api.settle_lapsed_offer(public.session_assignments) from public;
