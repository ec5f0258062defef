-- name: event_for_row
-- The event that inserted a row of a realtime table (a probe ping), once committed.
select id
from realtime.events
where table_name = %(table)s and row_id = %(row_id)s and type = 'INSERT' and id is not null
order by id
limit 1;
