-- 0010: the event log's rows made from decoded changes, the way capture makes them.
--
-- The capture triggers (0002/0003) cost the writers a third of their commits/s on this
-- machine; decoding the captured tables' changes from the WAL costs them next to nothing
-- (docs/decisions.md, "Where the rest of the gap is"). This is the part of that change
-- that lives in the database: given changes as a decoder reads them (db/pgoutput.py,
-- db/capture.py), the events capture would have written for them, with the same record,
-- old record and keys (the same key functions, applied to the same row values), and the
-- same rule that an update nothing visible changed writes no event; and
-- realtime.apply_decoded, which writes them with their ids, each decoded transaction once.
-- Nothing calls them in the product yet (the capture triggers still write the log):
-- tests/db/test_decoded_events.py holds them to the triggers' output and db/decoder.py's
-- tests to exactly once.
--
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

-- The last decoded transaction whose events are in the log (its commit LSN): a stream
-- that starts again sends what was not confirmed yet, and it must not be applied twice.
alter table realtime.stream add column decoded_lsn pg_lsn;

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

revoke execute on function realtime.decoded_events(jsonb) from public;
revoke execute on function realtime.apply_decoded(jsonb) from public;
