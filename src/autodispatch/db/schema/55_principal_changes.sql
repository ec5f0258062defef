-- Principal changes: a change to what a user may see is an event in the log.
--
-- A subscriber's visibility keys come from auth.principal_keys_for (the rule row-level
-- security uses, 40_visibility.sql): the account type, the mechanic row and its
-- workshop. Every change that can move a user's keys (profiles, mechanics, disabling or
-- deleting the account) writes one event on `auth.principals`, in the same transaction
-- and so in commit order with every row event: the gateways re-key that user's
-- subscriptions exactly there, and send removals for the rows that left the user's view
-- (realtime.rows_leaving_view). So a mechanic moved to another workshop stops receiving
-- the old workshop's requests at the same point in the log where RLS starts hiding them.

-- The keys each user was last given: what a principal event says they had before (null
-- only for a moment, while note_principal writes a new user's first keys).
create table realtime.principals (
  user_id uuid primary key,
  keys text[],
  born xid8 not null default pg_current_xact_id()  -- the transaction that made the user
);

-- Recompute one user's keys; when they differ from what the user had, remember them and
-- write an event: schema 'auth', table 'principals', row_id the user's id, the keys in
-- record / old_record ({"keys": [...]}). Its new_keys and old_keys are empty: no
-- subscriber receives it as a row; the gateways act on it. A user made in this very
-- transaction gets no event (nobody can have subscribed as them yet).
create function realtime.note_principal(p_uid uuid) returns void
language plpgsql security definer set search_path = '' as $$
declare
  v_old text[];
  v_new text[];
  v_born xid8;
begin
  insert into realtime.principals (user_id, keys) values (p_uid, null::text[])
  on conflict (user_id) do nothing;
  -- Locked first, then computed: two transactions changing one user queue up here, and
  -- the second one computes its keys after the first has committed.
  select keys, born into v_old, v_born from realtime.principals where user_id = p_uid for update;
  v_new := auth.principal_keys_for(p_uid);
  if v_old is not distinct from v_new then
    return;
  end if;
  update realtime.principals set keys = v_new where user_id = p_uid;
  if v_old is null or v_born = pg_current_xact_id() then
    return;
  end if;
  insert into realtime.events (schema_name, table_name, type, row_id, record, old_record)
  values ('auth', 'principals', 'UPDATE', p_uid::text,
          jsonb_build_object('user_id', p_uid, 'keys', to_jsonb(v_new)),
          jsonb_build_object('user_id', p_uid, 'keys', to_jsonb(v_old)));
end
$$;

create function realtime.principal_changed() returns trigger
language plpgsql security definer set search_path = '' as $$
begin
  if tg_table_name = 'mechanics' then
    if tg_op <> 'INSERT' then perform realtime.note_principal(old.user_id); end if;
    if tg_op <> 'DELETE' and (tg_op = 'INSERT' or new.user_id is distinct from old.user_id) then
      perform realtime.note_principal(new.user_id);
    end if;
  elsif tg_op = 'DELETE' then
    perform realtime.note_principal(old.id);
  else
    perform realtime.note_principal(new.id);
  end if;
  return null;
end
$$;

create trigger principal_changed after insert or update or delete on public.profiles
  for each row execute function realtime.principal_changed();
create trigger principal_changed after insert or update or delete on public.mechanics
  for each row execute function realtime.principal_changed();
create trigger principal_changed after update of disabled_at or delete on auth.users
  for each row execute function realtime.principal_changed();

-- The rows of these tables that a user with keys p_had could see at event p_at and a user
-- with keys p_has cannot: the removals a subscriber gets when its keys change there.
-- Each row is taken as it was at p_at: its last event up to p_at (a DELETE: gone), else
-- the version its first later event replaced (an INSERT: not there yet), else, for a row
-- with no event kept (unchanged longer than the retention window), as it is now. An event
-- that has committed without an id yet will be numbered after every numbered one, so it
-- counts as later than p_at (the version before it is the row's state then).
-- At most p_limit rows (the caller asks for one more than it will send).
create function realtime.rows_leaving_view(
  p_tables text[], p_at bigint, p_had text[], p_has text[], p_limit int
) returns table (table_name text, record jsonb, keys text[])
language sql stable security definer set search_path = '' as $$
  with events as (
    select e.table_name, e.row_id, e.id, e.seq, e.record, e.old_record, e.new_keys,
           e.old_keys, coalesce(e.id > p_at, true) as later
    from realtime.events e
    where e.schema_name = 'public' and e.table_name = any(p_tables)
  ),
  versions as (
    select distinct on (e.table_name, e.row_id)
           e.table_name,
           case when e.later then e.old_record else e.record end as record,
           case when e.later then e.old_keys else e.new_keys end as keys
    from events e
    -- The last event up to p_at, else the first after it (numbered before unnumbered).
    order by e.table_name, e.row_id, e.later,
             case when not e.later then -e.id end, (e.id is null), e.id, e.seq
  ),
  unlogged_rows as (
    select 'sessions' as table_name, to_jsonb(s) - 'visibility_keys' as record,
           public.session_visibility_keys(s) as keys, s.id::text as row_id
    from public.sessions s where 'sessions' = any(p_tables)
    union all
    select 'session_assignments', to_jsonb(a), public.assignment_visibility_keys(a), a.id::text
    from public.session_assignments a where 'session_assignments' = any(p_tables)
    union all
    select 'session_messages', to_jsonb(m) - 'visibility_keys', public.message_visibility_keys(m),
           m.id::text
    from public.session_messages m where 'session_messages' = any(p_tables)
    union all
    select 'probe_pings', to_jsonb(p), public.probe_visibility_keys(p), p.id::text
    from public.probe_pings p where 'probe_pings' = any(p_tables)
  )
  select v.table_name, v.record, v.keys from versions v
  where v.record is not null and v.keys && p_had and not v.keys && p_has
  union all
  select u.table_name, u.record, u.keys from unlogged_rows u
  where u.keys && p_had and not u.keys && p_has
    and not exists (
      select 1 from realtime.events e
      where e.schema_name = 'public' and e.table_name = u.table_name and e.row_id = u.row_id)
  limit p_limit
$$;

-- Only the servers call these, as the owner; the API's roles may not.
revoke execute on function
  realtime.note_principal(uuid),
  realtime.principal_changed(),
  realtime.rows_leaving_view(text[], bigint, text[], text[], int)
from public;
