-- name: stream_head
select last_id, pruned_through from realtime.stream where id = 1;

-- name: events_after
-- The log in order. Ids are given after commit, contiguously, one sequencing transaction
-- at a time (migration 0008), so nothing below the highest id seen can still appear.
select id, at, schema_name, table_name, type, row_id, record, old_record, new_keys, old_keys
from realtime.events
where id > %(after)s
order by id
limit %(limit)s;

-- name: events_for_keys_after
-- A resume: the events one principal may see, after its cursor, for some tables; and,
-- from the same snapshot (one statement), the pruned horizon. When the horizon has passed
-- the cursor, a prune committed during the resume and this page may have lost events:
-- the caller must not use it. With no event to return, one row of nulls carries it.
select s.pruned_through, e.*
from realtime.stream s
left join lateral (
  select id, at, schema_name, table_name, type, row_id, record, old_record, new_keys, old_keys
  from realtime.events
  where id > %(after)s
    and ((table_name = any(%(tables)s) and (new_keys && %(keys)s or old_keys && %(keys)s))
         -- and the changes of the subscriber's own keys (migration 0006), in their place
         or (schema_name = 'auth' and table_name = 'principals' and row_id = %(user_id)s))
  order by id
  limit %(limit)s
) e on true
where s.id = 1
order by e.id;

-- name: event_by_id
select id, at, schema_name, table_name, type, row_id, record, old_record, new_keys, old_keys
from realtime.events
where id = %(id)s;

-- name: principal_keys_for
select auth.principal_keys_for(%(user_id)s) as keys;

-- name: principal_keys_and_head
-- A subscriber's keys and the log's head in one snapshot: every change of those keys
-- up to `head` is in them, and any later one is an event after `head`, unless a change
-- has committed without its id yet (`pending`, migration 0008): it is in the keys but
-- would be numbered after `head`; the caller numbers it and reads again.
select auth.principal_keys_for(%(user_id)s) as keys,
       (select last_id from realtime.stream where id = 1) as head,
       exists (select 1 from realtime.events
               where id is null and schema_name = 'auth' and table_name = 'principals'
                 and row_id = %(user_id)s::text) as pending;

-- name: principal_changes_after
-- How one user's keys changed after a cursor (migration 0006), in order.
select id, record -> 'keys' as keys, old_record -> 'keys' as old_keys
from realtime.events
where schema_name = 'auth' and table_name = 'principals' and row_id = %(user_id)s
  and id > %(after)s
order by id;

-- name: rows_leaving_view
-- The rows of these tables that keys `had` could see at event `at` and keys `has` cannot.
select table_name, record, keys
from realtime.rows_leaving_view(%(tables)s, %(at)s, %(had)s, %(has)s, %(limit)s);

-- name: column_types
-- Column types as realtime-js expects them in `columns` (pg_type names: int4, uuid, _text...).
select c.relname as table_name, a.attname as name, t.typname as type
from pg_attribute a
join pg_class c on c.oid = a.attrelid
join pg_namespace n on n.oid = c.relnamespace
join pg_type t on t.oid = a.atttypid
where n.nspname = 'public' and c.relname = any(%(tables)s)
  and a.attnum > 0 and not a.attisdropped and a.attname <> 'visibility_keys'
order by c.relname, a.attnum;

-- name: prune_events
select realtime.prune(make_interval(secs => %(keep_seconds)s)) as pruned;

-- name: sequence_events
-- Give ids to committed events that have none (realtime/sequencer.py, migration 0008).
select assigned, last_id from realtime.sequence(%(limit)s);
