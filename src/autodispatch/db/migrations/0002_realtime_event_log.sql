-- 0002: the realtime event log.
--
-- Every change to a table users subscribe to writes an event in the same transaction:
-- the new and old rows, the visibility keys of both versions, the time. Event ids are
-- handed out at commit, by a deferred trigger, under the row lock of realtime.stream,
-- which is held until the commit ends (DESIGN section 8, approach (b)). So ids commit in
-- order and without gaps: a reader asking for "id > last" can never skip an event that
-- commits later, and one row's events are in commit order (the id is also the row's
-- version: it only grows for a given row). Taking the lock at commit, not at the first
-- write, means it is always a transaction's last lock: a writer holding it never waits
-- for anything else, so it cannot be part of a deadlock.

create schema if not exists realtime;

-- A session's visibility is its assignment's. Keep those keys on the session row itself,
-- so the old and the new version of a session each carry their own keys (an event needs
-- both, and the assignment may already have changed when the session's event is made).
alter table public.sessions add column visibility_keys text[];

create or replace function public.session_visibility_keys(s public.sessions) returns text[]
language sql immutable as $$
  select coalesce(s.visibility_keys, array['admin', 'user:' || s.customer_id])
$$;

-- Visibility checks run for every row every query reads, so they must be cheap: SQL
-- functions simple enough to be inlined into the policies, and plpgsql (whose plans are
-- cached per connection) where a lookup is needed. The caller's keys are computed once
-- per transaction and kept in a transaction-local setting.
create or replace function public.intake_visibility_keys(i public.intakes) returns text[]
language sql stable as $$
  select coalesce(
    (select s.visibility_keys from public.sessions s where s.intake_id = i.id),
    array['admin', 'user:' || i.customer_id])
$$;

create or replace function auth.principal_keys_for(p_uid uuid) returns text[]
language plpgsql stable security definer set search_path = '' as $$
declare
  v_type text;
  v_mechanic uuid;
  v_workshop uuid;
begin
  select p.account_type, m.id, m.workshop_id into v_type, v_mechanic, v_workshop
  from public.profiles p
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

create or replace function auth.principal_keys() returns text[]
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

-- The keys a session row will have once this transaction's triggers have run: those of
-- its assignment, moved to where sync_assignment_with_session (migration 0001) will move
-- it when the session ends. So the session's own event already carries its final keys.
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

-- BEFORE: runs after sessions_guard (trigger names fire in alphabetical order).
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

update public.sessions s set visibility_keys = public.assignment_visibility_keys(a)
from public.session_assignments a where a.session_id = s.id;

create function public.feature_flag_visibility_keys(f public.feature_flags) returns text[]
language sql immutable as $$
  select array['public']
$$;

create table realtime.stream (
  id int primary key constraint stream_single_row check (id = 1),
  last_id bigint not null,
  pruned_through bigint not null default 0
);
insert into realtime.stream (id, last_id) values (1, 0);

create table realtime.events (
  seq bigint generated always as identity primary key,  -- insert order, internal
  id bigint unique,  -- the stream offset, set at commit; null only inside the writer
  at timestamptz not null default clock_timestamp(),
  schema_name text not null,
  table_name text not null,
  type text not null constraint events_type_check check (type in ('INSERT', 'UPDATE', 'DELETE')),
  row_id text not null,
  record jsonb,
  old_record jsonb,
  new_keys text[] not null default '{}',
  old_keys text[] not null default '{}'
);
create index events_at_idx on realtime.events (at);

-- AFTER INSERT OR UPDATE OR DELETE on each subscribed table.
create function realtime.capture() returns trigger
language plpgsql security definer set search_path = '' as $$
declare
  v_new jsonb;
  v_old jsonb;
  v_new_keys text[] := '{}';
  v_old_keys text[] := '{}';
begin
  if tg_op <> 'DELETE' then
    v_new := to_jsonb(new) - 'visibility_keys';
  end if;
  if tg_op <> 'INSERT' then
    v_old := to_jsonb(old) - 'visibility_keys';
  end if;
  if tg_op = 'UPDATE' and v_new = v_old then
    return null;  -- nothing a subscriber could see changed
  end if;
  -- One branch per table: each compiles against that table's row type.
  if tg_table_name = 'sessions' then
    if tg_op <> 'DELETE' then v_new_keys := public.session_visibility_keys(new); end if;
    if tg_op <> 'INSERT' then v_old_keys := public.session_visibility_keys(old); end if;
  elsif tg_table_name = 'session_assignments' then
    if tg_op <> 'DELETE' then v_new_keys := public.assignment_visibility_keys(new); end if;
    if tg_op <> 'INSERT' then v_old_keys := public.assignment_visibility_keys(old); end if;
  elsif tg_table_name = 'feature_flags' then
    if tg_op <> 'DELETE' then v_new_keys := public.feature_flag_visibility_keys(new); end if;
    if tg_op <> 'INSERT' then v_old_keys := public.feature_flag_visibility_keys(old); end if;
  else
    raise exception 'realtime.capture() has no visibility rule for table %', tg_table_name;
  end if;
  insert into realtime.events (schema_name, table_name, type, row_id, record, old_record,
                               new_keys, old_keys)
  values (tg_table_schema, tg_table_name, tg_op,
          coalesce(v_new, v_old) ->> (case when tg_table_name = 'feature_flags' then 'key' else 'id' end),
          v_new, v_old, v_new_keys, v_old_keys);
  return null;
end
$$;

-- At commit: the stream lock, then the next offset for each of this transaction's events,
-- in the order they were written.
create function realtime.assign_id() returns trigger
language plpgsql security definer set search_path = '' as $$
declare
  v_id bigint;
begin
  update realtime.stream set last_id = last_id + 1 where id = 1 returning last_id into v_id;
  update realtime.events set id = v_id, at = clock_timestamp() where seq = new.seq;
  -- A wake-up for readers; identical payloads in one transaction fold into one.
  perform pg_notify('autodispatch_events', '');
  return null;
end
$$;

create constraint trigger events_assign_id after insert on realtime.events
  deferrable initially deferred
  for each row execute function realtime.assign_id();

-- Named to fire first among each table's AFTER triggers: a trigger that changes the same
-- row again (a nested update) then writes its event after this one, so one row's events
-- are never out of order within a transaction.
create trigger a_realtime_capture after insert or update or delete on public.sessions
  for each row execute function realtime.capture();
create trigger a_realtime_capture after insert or update or delete on public.session_assignments
  for each row execute function realtime.capture();
create trigger a_realtime_capture after insert or update or delete on public.feature_flags
  for each row execute function realtime.capture();

-- Retention: drop events older than p_keep; remember the highest id dropped, so a
-- client resuming from before it is told to re-sync instead of missing events.
create function realtime.prune(p_keep interval) returns bigint
language plpgsql security definer set search_path = '' as $$
declare
  v_through bigint;
  v_count bigint;
begin
  select max(id) into v_through from realtime.events where at < now() - p_keep;
  if v_through is null then
    return 0;
  end if;
  delete from realtime.events where id <= v_through;
  get diagnostics v_count = row_count;
  update realtime.stream set pruned_through = greatest(pruned_through, v_through) where id = 1;
  return v_count;
end
$$;

revoke all on schema realtime from public;
revoke execute on all functions in schema realtime from public;
