-- The realtime event log: every change to a table users subscribe to is an event, with the
-- new and old rows, the visibility keys of both versions (40_visibility.sql) and the time.
-- The gateways read it in id order and send each event to the subscribers whose keys
-- overlap its keys; a client resumes from the last id it saw.
--
-- Writers only insert events, with no id, in their own transaction (the capture
-- triggers); they take no lock another writer needs and send no NOTIFY. A sequencer,
-- realtime.sequence(), gives ids afterwards to the events that have committed, in insert
-- order (seq), continuing realtime.stream.last_id without a gap, in one short transaction
-- that only sequencers take the stream's row lock in; then one NOTIFY wakes the readers.
-- Every server process runs it after its own writes commit and on a short timer (for
-- writes made by SQL from elsewhere). What that keeps true:
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
--
-- The log could also be written from changes decoded from the WAL instead of by the
-- capture triggers: realtime.decoded_events and realtime.apply_decoded, at the end.

-- The log's head: the last id handed out, the highest id pruned, and the commit LSN of
-- the last decoded transaction whose events are in the log.
create table realtime.stream (
  id int primary key constraint stream_single_row check (id = 1),
  last_id bigint not null,
  pruned_through bigint not null default 0,
  -- A decoding stream that starts again sends what was not confirmed yet, and it must
  -- not be applied twice.
  decoded_lsn pg_lsn
);
insert into realtime.stream (id, last_id) values (1, 0);

create table realtime.events (
  seq bigint generated always as identity primary key,  -- insert order, internal
  id bigint unique,  -- the stream offset, given by the sequencer; null until then
  at timestamptz not null default clock_timestamp(),  -- when the event was written
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
-- What the sequencer looks for: events that committed without an id.
create index events_unsequenced_idx on realtime.events (seq) where id is null;

-- ---------------------------------------------------------------------------
-- Capture: the triggers that write the events.
-- ---------------------------------------------------------------------------

-- AFTER INSERT OR UPDATE OR DELETE on each subscribed table. An update that changed
-- nothing a subscriber could see (only visibility_keys, or nothing) writes no event.
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
  elsif tg_table_name = 'session_messages' then
    if tg_op <> 'DELETE' then v_new_keys := public.message_visibility_keys(new); end if;
    if tg_op <> 'INSERT' then v_old_keys := public.message_visibility_keys(old); end if;
  elsif tg_table_name = 'probe_pings' then
    if tg_op <> 'DELETE' then v_new_keys := public.probe_visibility_keys(new); end if;
    if tg_op <> 'INSERT' then v_old_keys := public.probe_visibility_keys(old); end if;
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

-- Named to fire first among each table's AFTER triggers: a trigger that changes the same
-- row again (a nested update) then writes its event after this one, so one row's events
-- are never out of order within a transaction.
create trigger a_realtime_capture after insert or update or delete on public.sessions
  for each row execute function realtime.capture();
create trigger a_realtime_capture after insert or update or delete on public.session_assignments
  for each row execute function realtime.capture();
create trigger a_realtime_capture after insert or update or delete on public.feature_flags
  for each row execute function realtime.capture();
create trigger a_realtime_capture after insert or update or delete on public.session_messages
  for each row execute function realtime.capture();
create trigger a_realtime_capture after insert or update or delete on public.probe_pings
  for each row execute function realtime.capture();

-- ---------------------------------------------------------------------------
-- The sequencer and retention
-- ---------------------------------------------------------------------------

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

-- Retention: drop events older than p_keep; remember the highest id dropped, so a client
-- resuming from before it is told to re-sync instead of missing events. An event's `at`
-- is when it was written, not when it got its id, so a transaction that stayed open gets
-- a high id with an old time: the prune drops events up to the first one (by id) still
-- inside the window, never past it. Everything it drops is older than p_keep, and what it
-- keeps is a whole suffix of the log. It reads the ids in order from the oldest: about as
-- many rows as it drops.
create function realtime.prune(p_keep interval) returns bigint
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

-- How far through the event log pushes have been sent, and who is sending. One process
-- at a time sends: it takes this row's lease in a short transaction, sends with no
-- transaction open, and moves last_id in another (only from where it began). A lease
-- that runs out (its server died) passes to the next sender; a restart carries on here.
create table realtime.push_cursor (
  id int primary key constraint push_cursor_single_row check (id = 1),
  last_id bigint not null,
  lease_owner uuid,
  lease_expires_at timestamptz
);
insert into realtime.push_cursor (id, last_id) values (1, 0);

-- ---------------------------------------------------------------------------
-- Events from decoded changes
--
-- The measured alternative to the capture triggers, run by `bench writes`; the product
-- does not call these (the capture triggers write the log: decoding spares the writers,
-- but the log falls behind them, docs/decisions.md). Given changes as a decoder reads
-- them from the WAL (db/pgoutput.py, db/capture.py), realtime.decoded_events makes the
-- events capture would have written for them, with the same record, old record and keys
-- (the same key functions, applied to the same row values), and the same rule that an
-- update nothing visible changed writes no event; realtime.apply_decoded writes them with
-- their ids, each decoded transaction once. tests/db/test_decoded_events.py holds them to
-- the triggers' output and db/decoder.py's tests to exactly once.
-- ---------------------------------------------------------------------------

-- p_changes: a JSON array, in commit order, of
--   {"t": table, "o": "INSERT" | "UPDATE" | "DELETE", "n": new row, "p": old row,
--    "at": commit time, "l": the transaction's commit LSN}
--    and "j": the names of its json/jsonb columns, if it has any
-- where a row is an object of column -> the value's text (null for SQL null), as
-- jsonb_populate_record reads it; the text of the columns named in "j" is read here as
-- JSON, so a document keeps its exact numbers. "ord" is each change's place in the
-- array (1-based); changes that make no event are left out.

create function realtime.decoded_events(p_changes jsonb)
returns table (ord bigint, schema_name text, table_name text, type text, row_id text,
               record jsonb, old_record jsonb, new_keys text[], old_keys text[],
               at timestamptz)
language sql stable security definer set search_path = '' as $$
  with given as (
    select x.ord, x.c ->> 't' as t, x.c ->> 'o' as o,
           nullif(x.c -> 'n', 'null') as n, nullif(x.c -> 'p', 'null') as p,
           coalesce(x.c -> 'j', '[]') as j, (x.c ->> 'at')::timestamptz as at
    from jsonb_array_elements(p_changes) with ordinality as x(c, ord)
  ),
  c as (
    select g.ord, g.t, g.o, g.at,
           g.n || coalesce((select jsonb_object_agg(k, (g.n ->> k)::jsonb)
                            from jsonb_array_elements_text(g.j) k where g.n ->> k is not null),
                           '{}') as n,
           g.p || coalesce((select jsonb_object_agg(k, (g.p ->> k)::jsonb)
                            from jsonb_array_elements_text(g.j) k where g.p ->> k is not null),
                           '{}') as p
    from given g
  ),
  rows as (
    select c.ord, c.t, c.o, c.at,
           to_jsonb(r.new) - 'visibility_keys' as record,
           to_jsonb(r.old) - 'visibility_keys' as old_record,
           coalesce(case when c.n is not null then public.session_visibility_keys(r.new) end, '{}') as new_keys,
           coalesce(case when c.p is not null then public.session_visibility_keys(r.old) end, '{}') as old_keys
    from c cross join lateral (
      select case when c.n is not null then jsonb_populate_record(null::public.sessions, c.n) end as new,
             case when c.p is not null then jsonb_populate_record(null::public.sessions, c.p) end as old
    ) r
    where c.t = 'sessions'
    union all
    select c.ord, c.t, c.o, c.at, to_jsonb(r.new), to_jsonb(r.old),
           coalesce(case when c.n is not null then public.assignment_visibility_keys(r.new) end, '{}'),
           coalesce(case when c.p is not null then public.assignment_visibility_keys(r.old) end, '{}')
    from c cross join lateral (
      select case when c.n is not null then jsonb_populate_record(null::public.session_assignments, c.n) end as new,
             case when c.p is not null then jsonb_populate_record(null::public.session_assignments, c.p) end as old
    ) r
    where c.t = 'session_assignments'
    union all
    select c.ord, c.t, c.o, c.at, to_jsonb(r.new), to_jsonb(r.old),
           coalesce(case when c.n is not null then public.feature_flag_visibility_keys(r.new) end, '{}'),
           coalesce(case when c.p is not null then public.feature_flag_visibility_keys(r.old) end, '{}')
    from c cross join lateral (
      select case when c.n is not null then jsonb_populate_record(null::public.feature_flags, c.n) end as new,
             case when c.p is not null then jsonb_populate_record(null::public.feature_flags, c.p) end as old
    ) r
    where c.t = 'feature_flags'
    union all
    select c.ord, c.t, c.o, c.at,
           to_jsonb(r.new) - 'visibility_keys', to_jsonb(r.old) - 'visibility_keys',
           coalesce(case when c.n is not null then public.message_visibility_keys(r.new) end, '{}'),
           coalesce(case when c.p is not null then public.message_visibility_keys(r.old) end, '{}')
    from c cross join lateral (
      select case when c.n is not null then jsonb_populate_record(null::public.session_messages, c.n) end as new,
             case when c.p is not null then jsonb_populate_record(null::public.session_messages, c.p) end as old
    ) r
    where c.t = 'session_messages'
    union all
    select c.ord, c.t, c.o, c.at, to_jsonb(r.new), to_jsonb(r.old),
           coalesce(case when c.n is not null then public.probe_visibility_keys(r.new) end, '{}'),
           coalesce(case when c.p is not null then public.probe_visibility_keys(r.old) end, '{}')
    from c cross join lateral (
      select case when c.n is not null then jsonb_populate_record(null::public.probe_pings, c.n) end as new,
             case when c.p is not null then jsonb_populate_record(null::public.probe_pings, c.p) end as old
    ) r
    where c.t = 'probe_pings'
  )
  select r.ord, 'public', r.t, r.o,
         coalesce(r.record, r.old_record) ->> (case when r.t = 'feature_flags' then 'key' else 'id' end),
         r.record, r.old_record, r.new_keys, r.old_keys, r.at
  from rows r
  -- As capture: an update that changed nothing a subscriber could see makes no event.
  where not (r.o = 'UPDATE' and r.record = r.old_record)
  order by r.ord
$$;

-- Apply decoded changes: the events of the transactions after decoded_lsn get the next
-- ids, in order, in the transaction that records the new decoded_lsn (so a crash between
-- this commit and the slot's confirmation applies nothing twice); then one NOTIFY wakes
-- the readers. The stream's row lock makes appliers take turns (one process decodes).
create function realtime.apply_decoded(p_changes jsonb)
returns table (assigned int, last_id bigint, decoded_lsn pg_lsn)
language plpgsql security definer set search_path = '' as $$
declare
  v_last bigint;
  v_done pg_lsn;
  v_fresh jsonb;
  v_through pg_lsn;
  v_count int;
begin
  -- Durable before the decoder confirms the slot past these changes, whatever the
  -- server's or the role's setting: else a crash could lose events the slot won't resend.
  perform set_config('synchronous_commit', 'on', true);
  select s.last_id, s.decoded_lsn into v_last, v_done from realtime.stream s where s.id = 1 for update;
  select coalesce(jsonb_agg(x.c order by x.ord), '[]'), max((x.c ->> 'l')::pg_lsn)
    into v_fresh, v_through
  from jsonb_array_elements(p_changes) with ordinality as x(c, ord)
  where v_done is null or (x.c ->> 'l')::pg_lsn > v_done;
  insert into realtime.events (id, at, schema_name, table_name, type, row_id, record,
                               old_record, new_keys, old_keys)
  select v_last + row_number() over (order by d.ord), d.at, d.schema_name, d.table_name,
         d.type, d.row_id, d.record, d.old_record, d.new_keys, d.old_keys
  from realtime.decoded_events(v_fresh) d;
  get diagnostics v_count = row_count;
  if v_through is not null then
    update realtime.stream s
    set last_id = v_last + v_count, decoded_lsn = v_through
    where s.id = 1;
  end if;
  if v_count > 0 then
    perform pg_notify('autodispatch_events', (v_last + v_count)::text);
  end if;
  return query select v_count, v_last + v_count, coalesce(v_through, v_done);
end
$$;

-- Only the servers call these, as the owner; the API's roles may not.
revoke execute on function
  realtime.capture(),
  realtime.sequence(int),
  realtime.prune(interval),
  realtime.decoded_events(jsonb),
  realtime.apply_decoded(jsonb)
from public;
