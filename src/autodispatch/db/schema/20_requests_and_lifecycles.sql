-- Requests and their lifecycles: a customer's intake, the session it asks for, the
-- session's assignment (the request as mechanics see and take it), waivers and payments;
-- the table of allowed moves, the guard that holds every writer to it, the audit row of
-- each move, and the triggers that keep a session and its assignment in step. Every rule
-- here holds for every writer, not only for the api.* functions (60_api_dispatch.sql).
--
-- Triggers of one table and timing fire in name order; the names below are chosen for it.
-- What the database does when a session ends (api.end_session sets status 'completed' or
-- 'cancelled'; any other writer gets the same):
--
--   1. sessions_guard (before): the move must be in lifecycle_transitions, else AD409
--      invalid_transition; updated_at is set.
--   2. sessions_keys (before): the session's visibility_keys become those its assignment
--      will have after step 5, so the session's own event already carries its final keys.
--   3. a_realtime_capture (after, 50_event_log.sql): the session's event in the log.
--   4. sessions_audit (after): one lifecycle_audit row, with the reason the transaction
--      gave (api.because), else 'direct update'.
--   5. sessions_sync_assignment (after): an accepted assignment becomes completed with a
--      completed session; an assignment not yet ended (pending_waiver, queued, offered,
--      accepted) becomes cancelled with a cancelled session; ended_at is set. That update
--      runs the assignment's own triggers: its guard (leaving an offer clears it), its
--      event, its audit row; session_assignments_sync_session and
--      session_assignments_visibility then find the session already in step.
--
-- The other way round, an assignment that is accepted puts its session in 'waiting' with
-- that mechanic, and one that expires or is cancelled cancels its session.

-- ---------------------------------------------------------------------------
-- Requests
-- ---------------------------------------------------------------------------

create table public.intakes (
  id uuid primary key default gen_random_uuid(),
  customer_id uuid not null references public.profiles (id),
  name text not null constraint intakes_name_check check (length(btrim(name)) between 1 and 100),
  vehicle_year integer not null
    constraint intakes_vehicle_year_check check (vehicle_year between 1900 and 2200),
  vehicle_make text not null
    constraint intakes_vehicle_make_check check (length(btrim(vehicle_make)) between 1 and 60),
  vehicle_model text not null
    constraint intakes_vehicle_model_check check (length(btrim(vehicle_model)) between 1 and 60),
  concern text not null
    constraint intakes_concern_check check (length(btrim(concern)) between 1 and 2000),
  created_at timestamptz not null default now()
);
create index intakes_customer_idx on public.intakes (customer_id);

-- The CHECK bounds the year for good; a year past next year is refused here, since a
-- CHECK may not depend on the time it runs.
create function public.check_vehicle_year() returns trigger
language plpgsql as $$
begin
  if new.vehicle_year > extract(year from now())::int + 1 then
    raise exception using
      errcode = 'AD422', hint = 'invalid_input',
      message = format('vehicle_year %s is in the future; use a year from 1900 to %s',
                       new.vehicle_year, extract(year from now())::int + 1);
  end if;
  return new;
end
$$;

create trigger intakes_check_vehicle_year before insert or update on public.intakes
  for each row execute function public.check_vehicle_year();

create table public.sessions (
  id uuid primary key default gen_random_uuid(),
  customer_id uuid not null references public.profiles (id),
  intake_id uuid not null unique references public.intakes (id),
  type text not null constraint sessions_type_check check (type in ('free', 'paid')),
  plan text constraint sessions_plan_check check (plan is null or length(plan) between 1 and 60),
  workshop_id uuid references public.workshops (id),
  mechanic_id uuid references public.mechanics (id),
  status text not null default 'pending'
    constraint sessions_status_check
    check (status in ('pending', 'waiting', 'live', 'completed', 'cancelled')),
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  started_at timestamptz,
  ended_at timestamptz,
  -- A session's visibility is its assignment's. The keys are kept on the session row
  -- itself, so the old and the new version of a session each carry their own keys (an
  -- event needs both, and the assignment may already have changed when the session's
  -- event is made). Set by the sessions_keys and session_assignments_visibility
  -- triggers below; never shown to a subscriber.
  visibility_keys text[]
);
create index sessions_customer_idx on public.sessions (customer_id);
create index sessions_mechanic_idx on public.sessions (mechanic_id);

-- One per session, made with it (sessions_create_assignment). An offer is one mechanic's
-- exclusive chance to take a queued request until offer_expires_at.
create table public.session_assignments (
  id uuid primary key default gen_random_uuid(),
  session_id uuid not null unique references public.sessions (id) on delete cascade,
  customer_id uuid not null references public.profiles (id),
  workshop_id uuid references public.workshops (id),
  status text not null default 'pending_waiver'
    constraint session_assignments_status_check
    check (status in ('pending_waiver', 'queued', 'offered', 'accepted', 'completed',
                      'cancelled', 'expired')),
  mechanic_id uuid references public.mechanics (id),
  mechanic_name text,
  offered_to uuid references public.mechanics (id),
  offer_expires_at timestamptz,
  request_summary jsonb not null,
  queued_at timestamptz,
  accepted_at timestamptz,
  ended_at timestamptz,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint session_assignments_offer_check
    check ((status = 'offered') = (offered_to is not null and offer_expires_at is not null)),
  constraint session_assignments_mechanic_check
    check (status not in ('accepted', 'completed') or mechanic_id is not null)
);
create index session_assignments_open_idx on public.session_assignments (queued_at)
  where status in ('queued', 'offered');
create index session_assignments_offer_expiry_idx on public.session_assignments (offer_expires_at)
  where status = 'offered';
create index session_assignments_mechanic_idx on public.session_assignments (mechanic_id);
create index session_assignments_customer_idx on public.session_assignments (customer_id);

create table public.waivers (
  id uuid primary key default gen_random_uuid(),
  session_id uuid not null unique references public.sessions (id) on delete cascade,
  customer_id uuid not null references public.profiles (id),
  signed_name text not null
    constraint waivers_signed_name_check check (length(btrim(signed_name)) between 1 and 200),
  signed_at timestamptz not null default now()
);

create table public.payments (
  id uuid primary key default gen_random_uuid(),
  session_id uuid not null unique references public.sessions (id) on delete cascade,
  customer_id uuid not null references public.profiles (id),
  status text not null default 'pending'
    constraint payments_status_check check (status in ('pending', 'confirmed')),
  provider text constraint payments_provider_check check (provider in ('stripe', 'dev')),
  provider_ref text unique,
  amount_cents integer constraint payments_amount_check check (amount_cents >= 0),
  created_at timestamptz not null default now(),
  confirmed_at timestamptz,
  constraint payments_confirmed_check
    check ((status = 'confirmed') = (confirmed_at is not null and provider is not null))
);

-- ---------------------------------------------------------------------------
-- Lifecycles: the table of allowed moves (autodispatch.domain.lifecycle repeats it, and a
-- test holds the two equal), the guard, the audit.
-- ---------------------------------------------------------------------------

create table public.lifecycle_transitions (
  entity text not null constraint lifecycle_transitions_entity_check
    check (entity in ('session', 'assignment')),
  from_status text not null,
  to_status text not null,
  primary key (entity, from_status, to_status)
);

insert into public.lifecycle_transitions (entity, from_status, to_status) values
  ('session', 'pending', 'waiting'),
  ('session', 'pending', 'cancelled'),
  ('session', 'waiting', 'live'),
  ('session', 'waiting', 'cancelled'),
  ('session', 'live', 'completed'),
  ('session', 'live', 'cancelled'),
  ('assignment', 'pending_waiver', 'queued'),
  ('assignment', 'pending_waiver', 'cancelled'),
  ('assignment', 'queued', 'offered'),
  ('assignment', 'queued', 'accepted'),
  ('assignment', 'queued', 'cancelled'),
  ('assignment', 'queued', 'expired'),
  ('assignment', 'offered', 'queued'),
  ('assignment', 'offered', 'accepted'),
  ('assignment', 'offered', 'cancelled'),
  ('assignment', 'accepted', 'completed'),
  ('assignment', 'accepted', 'cancelled');

create table public.lifecycle_audit (
  id bigint generated always as identity primary key,
  entity text not null constraint lifecycle_audit_entity_check
    check (entity in ('session', 'assignment')),
  entity_id uuid not null,
  session_id uuid not null,
  from_status text,
  to_status text not null,
  actor uuid,
  reason text not null,
  at timestamptz not null default now()
);
create index lifecycle_audit_session_idx on public.lifecycle_audit (session_id, id);

-- Why the current transaction changes state; the api.* functions set it.
create function public.transition_reason() returns text
language sql stable as $$
  select coalesce(nullif(current_setting('autodispatch.reason', true), ''), 'direct update')
$$;

-- BEFORE INSERT OR UPDATE on sessions and session_assignments.
-- tg_argv[0]: entity name, tg_argv[1]: its initial status.
create function public.guard_transition() returns trigger
language plpgsql as $$
begin
  if tg_op = 'INSERT' then
    if new.status is distinct from tg_argv[1] then
      raise exception using
        errcode = 'AD409', hint = 'invalid_transition',
        message = format('a new %s starts as %L, not %L', tg_argv[0], tg_argv[1], new.status);
    end if;
    return new;
  end if;
  if new.status is distinct from old.status then
    if not exists (
      select 1 from public.lifecycle_transitions t
      where t.entity = tg_argv[0] and t.from_status = old.status and t.to_status = new.status
    ) then
      raise exception using
        errcode = 'AD409', hint = 'invalid_transition',
        message = format('%s cannot move from %L to %L', tg_argv[0], old.status, new.status);
    end if;
    if tg_argv[0] = 'assignment' and old.status = 'offered' then
      -- Leaving an offer always clears it, whoever makes the move.
      new.offered_to := null;
      new.offer_expires_at := null;
    end if;
  end if;
  new.updated_at := now();
  return new;
end
$$;

-- AFTER INSERT OR UPDATE OF status: one audit row per transition.
create function public.audit_transition() returns trigger
language plpgsql as $$
begin
  if tg_op = 'INSERT' or new.status is distinct from old.status then
    insert into public.lifecycle_audit (entity, entity_id, session_id, from_status, to_status, actor, reason)
    values (
      tg_argv[0], new.id, coalesce((to_jsonb(new) ->> 'session_id')::uuid, new.id),
      case when tg_op = 'UPDATE' then old.status end, new.status, auth.uid(),
      public.transition_reason()
    );
  end if;
  return null;
end
$$;

create trigger sessions_guard before insert or update on public.sessions
  for each row execute function public.guard_transition('session', 'pending');
create trigger sessions_audit after insert or update of status on public.sessions
  for each row execute function public.audit_transition('session');
create trigger session_assignments_guard before insert or update on public.session_assignments
  for each row execute function public.guard_transition('assignment', 'pending_waiver');
create trigger session_assignments_audit after insert or update of status on public.session_assignments
  for each row execute function public.audit_transition('assignment');

-- ---------------------------------------------------------------------------
-- Keeping sessions and session_assignments in step.
-- ---------------------------------------------------------------------------

-- Everything a mechanic's alert shows, so no client fetches more.
create function public.build_request_summary(p_session public.sessions) returns jsonb
language sql stable as $$
  select jsonb_build_object(
    'customer_first_name', split_part(btrim(i.name), ' ', 1),
    'vehicle', format('%s %s %s', i.vehicle_year, btrim(i.vehicle_make), btrim(i.vehicle_model)),
    'vehicle_year', i.vehicle_year,
    'vehicle_make', btrim(i.vehicle_make),
    'vehicle_model', btrim(i.vehicle_model),
    'concern', btrim(i.concern),
    'session_type', p_session.type,
    'plan', p_session.plan,
    'workshop_id', p_session.workshop_id,
    'workshop_name', w.name,
    'created_at', p_session.created_at
  )
  from public.intakes i
  left join public.workshops w on w.id = p_session.workshop_id
  where i.id = p_session.intake_id
$$;

-- Every session gets its assignment in the same statement, free or paid.
create function public.create_assignment_for_session() returns trigger
language plpgsql as $$
begin
  insert into public.session_assignments (session_id, customer_id, workshop_id, request_summary)
  values (new.id, new.customer_id, new.workshop_id, public.build_request_summary(new));
  return null;
end
$$;

create trigger sessions_create_assignment after insert on public.sessions
  for each row execute function public.create_assignment_for_session();

-- A session that ends or is cancelled takes its assignment with it; a session may
-- only wait for or run with a mechanic whose assignment is accepted.
create function public.sync_assignment_with_session() returns trigger
language plpgsql as $$
declare
  v_assignment public.session_assignments;
begin
  if new.status is not distinct from old.status then
    return null;
  end if;
  select * into v_assignment from public.session_assignments where session_id = new.id for update;
  if not found then
    raise exception using
      errcode = 'AD409', hint = 'missing_assignment',
      message = format('session %s has no assignment; run autodispatch repair', new.id);
  end if;
  if new.status in ('waiting', 'live') and v_assignment.status <> 'accepted' then
    raise exception using
      errcode = 'AD409', hint = 'invalid_transition',
      message = format('session cannot move to %L while its assignment is %L; accept the assignment instead',
                       new.status, v_assignment.status);
  elsif new.status = 'completed' and v_assignment.status = 'accepted' then
    update public.session_assignments set status = 'completed', ended_at = now() where id = v_assignment.id;
  elsif new.status = 'cancelled' and v_assignment.status not in ('completed', 'cancelled', 'expired') then
    update public.session_assignments set status = 'cancelled', ended_at = now() where id = v_assignment.id;
  end if;
  return null;
end
$$;

create trigger sessions_sync_assignment after update of status on public.sessions
  for each row execute function public.sync_assignment_with_session();

-- An accepted assignment puts its session in 'waiting' with that mechanic; an
-- expired or cancelled one cancels its session; a completed one completes it.
create function public.sync_session_with_assignment() returns trigger
language plpgsql as $$
begin
  if new.status is not distinct from old.status then
    return null;
  end if;
  if new.status = 'accepted' then
    update public.sessions set status = 'waiting', mechanic_id = new.mechanic_id
    where id = new.session_id and status <> 'waiting';
  elsif new.status in ('expired', 'cancelled') then
    update public.sessions set status = 'cancelled', ended_at = coalesce(ended_at, now())
    where id = new.session_id and status not in ('completed', 'cancelled');
  elsif new.status = 'completed' then
    update public.sessions set status = 'completed', ended_at = coalesce(ended_at, now())
    where id = new.session_id and status <> 'completed';
  end if;
  return null;
end
$$;

create trigger session_assignments_sync_session after update of status on public.session_assignments
  for each row execute function public.sync_session_with_assignment();

-- The keys a session row will have once this transaction's triggers have run: those of
-- its assignment, moved to where sync_assignment_with_session (above) will move it when
-- the session ends. So the session's own event already carries its final keys.
create function public.refresh_session_keys() returns trigger
language plpgsql as $$
declare
  v_assignment public.session_assignments;
begin
  select * into v_assignment from public.session_assignments where session_id = new.id;
  if not found then
    new.visibility_keys := array['admin', 'user:' || new.customer_id];
    return new;
  end if;
  if new.status = 'completed' and v_assignment.status = 'accepted' then
    v_assignment.status := 'completed';
  elsif new.status = 'cancelled' and v_assignment.status not in ('completed', 'cancelled', 'expired') then
    v_assignment.status := 'cancelled';
  end if;
  new.visibility_keys := public.assignment_visibility_keys(v_assignment);
  return new;
end
$$;

-- BEFORE: runs after sessions_guard (name order).
create trigger sessions_keys before insert or update on public.sessions
  for each row execute function public.refresh_session_keys();

-- AFTER on assignments, named to fire after session_assignments_sync_session: when the
-- assignment's keys change and nothing updated the session yet, touch it.
create function public.push_keys_to_session() returns trigger
language plpgsql as $$
begin
  update public.sessions set visibility_keys = public.assignment_visibility_keys(new)
  where id = new.session_id
    and visibility_keys is distinct from public.assignment_visibility_keys(new);
  return null;
end
$$;

create trigger session_assignments_visibility after insert or update on public.session_assignments
  for each row execute function public.push_keys_to_session();
