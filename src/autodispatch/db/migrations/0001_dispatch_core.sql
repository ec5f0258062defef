-- 0001: the dispatch core.
--
-- Accounts, profiles, workshops, mechanics, intakes, sessions and their assignments,
-- waivers, payments, feature flags; the lifecycle guard, the triggers that keep
-- session_assignments in step with sessions and audit every transition; row-level
-- security built on one visibility function per table; the api.* functions that are
-- the only way the API changes dispatch state.
--
-- Errors raised here use SQLSTATE 'AD' || <http status> and put a stable code in the
-- HINT; autodispatch.db.errors maps them to the API's errors.

create schema if not exists auth;
create schema if not exists api;

-- Roles the API switches to for each request (SET LOCAL ROLE). Roles are per cluster,
-- so create them only once.
do $$
begin
  if not exists (select from pg_roles where rolname = 'anon') then
    create role anon nologin noinherit;
  end if;
  if not exists (select from pg_roles where rolname = 'authenticated') then
    create role authenticated nologin noinherit;
  end if;
end
$$;
grant anon, authenticated to current_user;

-- ---------------------------------------------------------------------------
-- The caller, as the API set it for this transaction.
-- ---------------------------------------------------------------------------

create function auth.claims() returns jsonb
language sql stable as $$
  select coalesce(nullif(current_setting('request.jwt.claims', true), ''), '{}')::jsonb
$$;

create function auth.uid() returns uuid
language sql stable as $$
  select nullif(auth.claims() ->> 'sub', '')::uuid
$$;

create function auth.role() returns text
language sql stable as $$
  select coalesce(auth.claims() ->> 'role', 'anon')
$$;

-- ---------------------------------------------------------------------------
-- Accounts
-- ---------------------------------------------------------------------------

create table auth.users (
  id uuid primary key default gen_random_uuid(),
  email text not null,
  password_hash text not null,
  created_at timestamptz not null default now(),
  constraint users_email_normalised check (email = lower(btrim(email)) and email ~ '^[^@\s]+@[^@\s]+$')
);
create unique index users_email_key on auth.users (email);

create table auth.refresh_tokens (
  token_hash text primary key,
  user_id uuid not null references auth.users (id) on delete cascade,
  created_at timestamptz not null default now(),
  expires_at timestamptz not null,
  revoked_at timestamptz
);
create index refresh_tokens_user_idx on auth.refresh_tokens (user_id);

create table auth.sign_in_failures (
  id bigint generated always as identity primary key,
  throttle_key text not null,
  failed_at timestamptz not null default now()
);
create index sign_in_failures_key_idx on auth.sign_in_failures (throttle_key, failed_at);

create table public.profiles (
  id uuid primary key references auth.users (id) on delete cascade,
  account_type text not null
    constraint profiles_account_type_check check (account_type in ('customer', 'mechanic', 'admin')),
  full_name text not null
    constraint profiles_full_name_check check (length(btrim(full_name)) between 1 and 200),
  created_at timestamptz not null default now()
);

create table public.workshops (
  id uuid primary key default gen_random_uuid(),
  name text not null constraint workshops_name_check check (length(btrim(name)) between 1 and 200),
  created_at timestamptz not null default now()
);
create unique index workshops_name_key on public.workshops (name);

create table public.mechanics (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null unique references public.profiles (id) on delete cascade,
  workshop_id uuid references public.workshops (id),
  display_name text not null
    constraint mechanics_display_name_check check (length(btrim(display_name)) between 1 and 200),
  created_at timestamptz not null default now()
);

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
  ended_at timestamptz
);
create index sessions_customer_idx on public.sessions (customer_id);
create index sessions_mechanic_idx on public.sessions (mechanic_id);

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

create table public.feature_flags (
  key text primary key constraint feature_flags_key_check check (key ~ '^[a-z][a-z0-9_]{1,62}$'),
  enabled boolean not null default false,
  description text not null default '',
  updated_at timestamptz not null default now(),
  updated_by uuid references auth.users (id) on delete set null
);

insert into public.feature_flags (key, enabled, description) values
  ('mech_new_request_alerts', true, 'Alert mechanics when a new request arrives (gates every tier)'),
  ('mech_audio_alerts', true, 'Play a sound with a new-request alert'),
  ('mech_browser_notifications', true, 'Show a system notification with a new-request alert'),
  ('mech_visual_indicators', true, 'Badge the tab title and favicon with a new-request alert');

-- ---------------------------------------------------------------------------
-- Lifecycles: the table of allowed moves (autodispatch.domain.lifecycle repeats it),
-- the guard, the audit.
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
-- Keeping sessions and session_assignments in step (DESIGN invariant 5).
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

-- ---------------------------------------------------------------------------
-- Visibility: one function per table gives the keys of a row; a principal holds a
-- set of keys; a principal may read a row iff the two sets overlap. Row-level
-- security uses exactly this, and so will the realtime router.
--
-- Keys: 'public' (everyone), 'admin', 'user:<profile id>', 'mechanic:<mechanic id>',
-- 'pool:general' (requests any mechanic may take), 'pool:workshop:<workshop id>'.
-- ---------------------------------------------------------------------------

create function auth.principal_keys_for(p_uid uuid) returns text[]
language sql stable security definer set search_path = '' as $$
  select coalesce(
    (select case p.account_type
              when 'admin' then array['public', 'user:' || p.id, 'admin']
              when 'mechanic' then
                array['public', 'user:' || p.id]
                || case when m.id is null then array[]::text[]
                        else array['pool:general', 'mechanic:' || m.id] end
                || case when m.workshop_id is null then array[]::text[]
                        else array['pool:workshop:' || m.workshop_id] end
              else array['public', 'user:' || p.id]
            end
     from public.profiles p
     left join public.mechanics m on m.user_id = p.id
     where p.id = p_uid),
    array['public'])
$$;

create function auth.principal_keys() returns text[]
language sql stable security definer set search_path = '' as $$
  select auth.principal_keys_for(auth.uid())
$$;

create function public.assignment_visibility_keys(a public.session_assignments) returns text[]
language sql immutable as $$
  select array_remove(array[
    'admin',
    'user:' || a.customer_id,
    case when a.status = 'queued' then coalesce('pool:workshop:' || a.workshop_id, 'pool:general') end,
    case when a.status = 'offered' then 'mechanic:' || a.offered_to end,
    case when a.mechanic_id is not null then 'mechanic:' || a.mechanic_id end
  ], null)
$$;

create function public.session_visibility_keys(s public.sessions) returns text[]
language sql stable security definer set search_path = '' as $$
  select coalesce(
    (select public.assignment_visibility_keys(a) from public.session_assignments a where a.session_id = s.id),
    array['admin', 'user:' || s.customer_id])
$$;

create function public.intake_visibility_keys(i public.intakes) returns text[]
language sql stable security definer set search_path = '' as $$
  select coalesce(
    (select public.session_visibility_keys(s) from public.sessions s where s.intake_id = i.id),
    array['admin', 'user:' || i.customer_id])
$$;

create function public.owner_visibility_keys(p_owner uuid) returns text[]
language sql immutable as $$
  select array['admin', 'user:' || p_owner]
$$;

create function public.mechanic_visibility_keys(m public.mechanics) returns text[]
language sql immutable as $$
  select array['admin', 'user:' || m.user_id, 'mechanic:' || m.id]
$$;

alter table public.profiles enable row level security;
alter table public.workshops enable row level security;
alter table public.mechanics enable row level security;
alter table public.intakes enable row level security;
alter table public.sessions enable row level security;
alter table public.session_assignments enable row level security;
alter table public.waivers enable row level security;
alter table public.payments enable row level security;
alter table public.feature_flags enable row level security;
alter table public.lifecycle_transitions enable row level security;
alter table public.lifecycle_audit enable row level security;

create policy profiles_visible on public.profiles for select to anon, authenticated
  using (public.owner_visibility_keys(id) && (select auth.principal_keys()));
create policy workshops_visible on public.workshops for select to anon, authenticated
  using (true);
create policy mechanics_visible on public.mechanics for select to anon, authenticated
  using (public.mechanic_visibility_keys(mechanics) && (select auth.principal_keys()));
create policy intakes_visible on public.intakes for select to anon, authenticated
  using (public.intake_visibility_keys(intakes) && (select auth.principal_keys()));
create policy sessions_visible on public.sessions for select to anon, authenticated
  using (public.session_visibility_keys(sessions) && (select auth.principal_keys()));
create policy session_assignments_visible on public.session_assignments for select to anon, authenticated
  using (public.assignment_visibility_keys(session_assignments) && (select auth.principal_keys()));
create policy waivers_visible on public.waivers for select to anon, authenticated
  using (public.owner_visibility_keys(customer_id) && (select auth.principal_keys()));
create policy payments_visible on public.payments for select to anon, authenticated
  using (public.owner_visibility_keys(customer_id) && (select auth.principal_keys()));
create policy feature_flags_visible on public.feature_flags for select to anon, authenticated
  using (true);
create policy lifecycle_transitions_visible on public.lifecycle_transitions for select to anon, authenticated
  using (true);
create policy lifecycle_audit_visible on public.lifecycle_audit for select to anon, authenticated
  using (array['admin'] && (select auth.principal_keys()));

grant usage on schema public, auth, api to anon, authenticated;
grant select on all tables in schema public to anon, authenticated;
revoke execute on all functions in schema api from public;
revoke execute on all functions in schema auth from public;
grant execute on function auth.claims(), auth.uid(), auth.role(), auth.principal_keys()
  to anon, authenticated;

-- ---------------------------------------------------------------------------
-- api.*: the only way the API changes dispatch state. Each checks who is calling,
-- locks the session row first (one lock order everywhere), says why it moves, and
-- raises when nothing changed instead of reporting success.
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
