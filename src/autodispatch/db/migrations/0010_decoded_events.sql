-- 0010: the event log's rows made from decoded changes, the way capture makes them.
--
-- The capture triggers (0002/0003) cost the writers a third of their commits/s on this
-- machine; decoding the captured tables' changes from the WAL costs them next to nothing
-- (docs/decisions.md, "Where the rest of the gap is"). This is the part of that change
-- that lives in the database: given changes as a decoder reads them (db/pgoutput.py,
-- db/capture.py), the events capture would have written for them, with the same record,
-- old record and keys (the same key functions, applied to the same row values), and the
-- same rule that an update nothing visible changed writes no event. Nothing calls it in
-- the product yet: tests/db/test_decoded_events.py holds it to the triggers' output.
--
-- p_changes: a JSON array, in commit order, of
--   {"t": table, "o": "INSERT" | "UPDATE" | "DELETE", "n": new row, "p": old row,
--    "at": commit time}
-- where a row is an object of column -> the value's text (JSON itself for json/jsonb
-- columns, null for SQL null), as jsonb_populate_record reads it. "ord" is each change's
-- place in the array (1-based); changes that make no event are left out.

create function realtime.decoded_events(p_changes jsonb)
returns table (ord bigint, schema_name text, table_name text, type text, row_id text,
               record jsonb, old_record jsonb, new_keys text[], old_keys text[],
               at timestamptz)
language sql stable security definer set search_path = '' as $$
  with c as (
    select x.ord, x.c ->> 't' as t, x.c ->> 'o' as o,
           nullif(x.c -> 'n', 'null') as n, nullif(x.c -> 'p', 'null') as p,
           (x.c ->> 'at')::timestamptz as at
    from jsonb_array_elements(p_changes) with ordinality as x(c, ord)
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

revoke execute on function realtime.decoded_events(jsonb) from public;
