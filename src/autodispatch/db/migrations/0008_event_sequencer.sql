-- 0008: event ids are given after commit, by a sequencer, not inside the writer's commit.
--
-- Until now every transaction that wrote events took the row lock of realtime.stream at
-- commit (realtime.assign_id, 0002) and sent a NOTIFY, and held both through its WAL
-- flush: event-producing commits ran one at a time (0.16x the commits/s of the same
-- writes without the log, 32 writers, docs/decisions.md). Now a writer only inserts its
-- events, with no id; it takes no lock another writer needs and sends no NOTIFY.
--
-- realtime.sequence() gives ids to the events that have committed and have none yet, in
-- insert order (seq), continuing realtime.stream.last_id without a gap, in one short
-- transaction that only sequencers take the stream's row lock in; then one NOTIFY wakes
-- the readers. Every server process runs it after its own writes commit and on a short
-- timer (for writes made by SQL from elsewhere). What that keeps true:
--
-- - Gap-free: ids are handed out contiguously by one transaction at a time, and each
--   sequencing transaction commits all its ids at once, so a reader asking for "id >
--   cursor" sees a whole prefix of the log, never a hole that fills later.
-- - Per-row order: a transaction that changes a row another one changed first can only
--   write its event after that one committed (it waits for the row lock), so the earlier
--   event is committed, and sequenced, no later than the later one is inserted; ids
--   follow seq within a batch. A row's events get growing ids.
-- - An open writing transaction holds nothing back: its events get ids when it commits,
--   after those of transactions that committed first.
-- - Ids already handed out stay as they are: cursors from before this migration resume.

drop trigger events_assign_id on realtime.events;
drop function realtime.assign_id();

-- What the sequencer looks for: events that committed without an id.
create index events_unsequenced_idx on realtime.events (seq) where id is null;

-- Give ids to up to p_limit committed events that have none, oldest first; return how
-- many and the log's last id after. Cheap when there is nothing to do (no lock, no write).
create function realtime.sequence(p_limit int)
returns table (assigned int, last_id bigint)
language plpgsql security definer set search_path = '' as $$
declare
  v_last bigint;
  v_count int;
begin
  if not exists (select 1 from realtime.events e where e.id is null) then
    return query select 0, s.last_id from realtime.stream s where s.id = 1;
    return;
  end if;
  -- One sequencer at a time (other processes wait here, never writers); the next
  -- statement's snapshot is taken after the lock, so it sees what the last one assigned.
  select s.last_id into v_last from realtime.stream s where s.id = 1 for update;
  with todo as (
    select e.seq, v_last + row_number() over (order by e.seq) as new_id
    from realtime.events e
    where e.id is null
    order by e.seq
    limit p_limit
  )
  update realtime.events e set id = t.new_id from todo t where e.seq = t.seq;
  get diagnostics v_count = row_count;
  if v_count > 0 then
    update realtime.stream s set last_id = v_last + v_count where s.id = 1;
    perform pg_notify('autodispatch_events', (v_last + v_count)::text);
  end if;
  return query select v_count, v_last + v_count;
end
$$;

revoke execute on function realtime.sequence(int) from public;

-- Retention (0002's prune, changed): an event's `at` is now when it was written, not when
-- it got its id, so a transaction that stayed open gets a high id with an old time. The
-- prune drops events up to the first one (by id) still inside the window, never past it:
-- everything it drops is older than p_keep, and what it keeps is a whole suffix of the
-- log. It reads the ids in order from the oldest: about as many rows as it drops.
create or replace function realtime.prune(p_keep interval) returns bigint
language plpgsql security definer set search_path = '' as $$
declare
  v_young bigint;
  v_through bigint;
  v_count bigint;
begin
  select e.id into v_young from realtime.events e
  where e.id is not null and e.at >= now() - p_keep
  order by e.id limit 1;
  if v_young is null then
    select max(e.id) into v_through from realtime.events e;  -- every numbered one is old
  else
    v_through := v_young - 1;
  end if;
  if v_through is null or not exists (
    select 1 from realtime.events e where e.id is not null and e.id <= v_through
  ) then
    return 0;
  end if;
  delete from realtime.events where id <= v_through;
  get diagnostics v_count = row_count;
  update realtime.stream set pruned_through = greatest(pruned_through, v_through) where id = 1;
  return v_count;
end
$$;

-- Removals when a user's keys change (0006's rows_leaving_view, changed): an event that
-- has committed without an id yet will be numbered after every numbered one, so for the
-- row's version at p_at it counts as later than p_at (the version before it is the
-- row's state then). Before 0008 no other transaction could see such an event.
create or replace function realtime.rows_leaving_view(
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

revoke execute on all functions in schema realtime from public;
