-- Visibility: who may read which row. One function per table gives the keys of a row; a
-- principal (the caller) holds a set of keys; a principal may read a row iff the two sets
-- overlap. Row-level security uses exactly this, and so does the realtime router (an
-- event carries the keys of the row's old and new version, 50_event_log.sql).
--
-- Keys: 'public' (everyone), 'admin', 'user:<profile id>', 'mechanic:<mechanic id>',
-- 'pool:general' (requests any mechanic may take), 'pool:workshop:<workshop id>'.
--
-- The API's roles only read (select); they write through the api.* functions, which run
-- as the owner and check the caller themselves.

-- ---------------------------------------------------------------------------
-- A principal's keys
-- ---------------------------------------------------------------------------

-- A user's keys, from the account type, the mechanic row and its workshop. A disabled or
-- unknown user has only 'public'. The gateways use the same function, so a change of the
-- rows it reads is an event (auth.principals, 55_principal_changes.sql).
create function auth.principal_keys_for(p_uid uuid) returns text[]
language plpgsql stable security definer set search_path = '' as $$
declare
  v_type text;
  v_mechanic uuid;
  v_workshop uuid;
begin
  select p.account_type, m.id, m.workshop_id into v_type, v_mechanic, v_workshop
  from public.profiles p
  join auth.users u on u.id = p.id and u.disabled_at is null
  left join public.mechanics m on m.user_id = p.id
  where p.id = p_uid;
  if not found then
    return array['public'];
  elsif v_type = 'admin' then
    return array['public', 'user:' || p_uid, 'admin'];
  elsif v_type = 'mechanic' and v_mechanic is not null then
    return array['public', 'user:' || p_uid, 'pool:general', 'mechanic:' || v_mechanic]
           || case when v_workshop is null then array[]::text[]
                   else array['pool:workshop:' || v_workshop] end;
  end if;
  return array['public', 'user:' || p_uid];
end
$$;

-- The caller's keys. Visibility checks run for every row every query reads, so they must
-- be cheap: the keys are computed once per transaction and kept in a transaction-local
-- setting, with the user they were computed for.
create function auth.principal_keys() returns text[]
language plpgsql stable security definer set search_path = '' as $$
declare
  v_uid uuid := auth.uid();
  v_cached text := current_setting('autodispatch.principal_keys', true);
  v_keys text[];
begin
  if v_cached is not null and v_cached <> ''
     and split_part(v_cached, '|', 1) = coalesce(v_uid::text, '') then
    return split_part(v_cached, '|', 2)::text[];
  end if;
  v_keys := auth.principal_keys_for(v_uid);
  perform set_config('autodispatch.principal_keys', coalesce(v_uid::text, '') || '|' || v_keys::text, true);
  return v_keys;
end
$$;

revoke execute on function auth.principal_keys_for(uuid), auth.principal_keys() from public;
grant execute on function auth.principal_keys() to anon, authenticated;

-- ---------------------------------------------------------------------------
-- A row's keys
--
-- Each is one SQL expression, declared immutable, so PostgreSQL inlines it into the query
-- that calls it (an RLS policy, the capture trigger's expressions) instead of planning it
-- as a separate function in every transaction. PostgreSQL inlines a function only when
-- its body is no more volatile than it declares: `'user:' || some_uuid` is textanycat,
-- only stable (it calls the uuid's output function by type), so the uuids are cast with
-- `::text`, which is immutable (tests/db/test_schema.py checks the plans). The exception
-- is intake_visibility_keys: it reads sessions, a subquery PostgreSQL never inlines
-- (intakes have no events).
-- ---------------------------------------------------------------------------

-- The queue is the pool (a workshop's, else the general one); an offer is the offered
-- mechanic's; the accepted mechanic keeps the request after it ends.
create function public.assignment_visibility_keys(a public.session_assignments) returns text[]
language sql immutable as $$
  select array_remove(array[
    'admin',
    'user:' || a.customer_id::text,
    case when a.status = 'queued' then coalesce('pool:workshop:' || a.workshop_id::text, 'pool:general') end,
    case when a.status = 'offered' then 'mechanic:' || a.offered_to::text end,
    case when a.mechanic_id is not null then 'mechanic:' || a.mechanic_id::text end
  ], null)
$$;

-- A session's keys are its assignment's, kept on the row (sessions.visibility_keys,
-- 20_requests_and_lifecycles.sql); the fallback covers a session whose assignment does
-- not exist yet.
create function public.session_visibility_keys(s public.sessions) returns text[]
language sql immutable as $$
  select coalesce(s.visibility_keys, array['admin', 'user:' || s.customer_id::text])
$$;

create function public.intake_visibility_keys(i public.intakes) returns text[]
language sql stable as $$
  select coalesce(
    (select s.visibility_keys from public.sessions s where s.intake_id = i.id),
    array['admin', 'user:' || i.customer_id])
$$;

create function public.owner_visibility_keys(p_owner uuid) returns text[]
language sql immutable as $$
  select array['admin', 'user:' || p_owner::text]
$$;

create function public.mechanic_visibility_keys(m public.mechanics) returns text[]
language sql immutable as $$
  select array['admin', 'user:' || m.user_id::text, 'mechanic:' || m.id::text]
$$;

create function public.feature_flag_visibility_keys(f public.feature_flags) returns text[]
language sql immutable as $$
  select array['public']
$$;

create function public.message_visibility_keys(m public.session_messages) returns text[]
language sql immutable as $$
  select m.visibility_keys
$$;

create function public.probe_visibility_keys(p public.probe_pings) returns text[]
language sql immutable as $$
  select array['user:' || p.user_id::text]
$$;

-- ---------------------------------------------------------------------------
-- Row-level security: every public table, read through its keys.
-- ---------------------------------------------------------------------------

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
alter table public.session_messages enable row level security;
alter table public.alert_receipts enable row level security;
alter table public.push_subscriptions enable row level security;
alter table public.probe_pings enable row level security;

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
create policy session_messages_visible on public.session_messages for select to anon, authenticated
  using (public.message_visibility_keys(session_messages) && (select auth.principal_keys()));
create policy alert_receipts_visible on public.alert_receipts for select to anon, authenticated
  using (public.owner_visibility_keys(mechanic_user_id) && (select auth.principal_keys()));
create policy push_subscriptions_visible on public.push_subscriptions for select to anon, authenticated
  using (public.owner_visibility_keys(user_id) && (select auth.principal_keys()));
create policy probe_pings_visible on public.probe_pings for select to anon, authenticated
  using (public.probe_visibility_keys(probe_pings) && (select auth.principal_keys()));

grant select on public.profiles, public.workshops, public.mechanics, public.intakes,
  public.sessions, public.session_assignments, public.waivers, public.payments,
  public.feature_flags, public.lifecycle_transitions, public.lifecycle_audit,
  public.session_messages, public.alert_receipts, public.push_subscriptions,
  public.probe_pings
to anon, authenticated;
