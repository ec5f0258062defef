-- Gateway heartbeats (migration 0004) and the dispatch health figures each process
-- reports as metrics. Used by autodispatch.realtime.heartbeat and the /readyz route.

-- name: gateway_register
insert into realtime.gateways (id, host, pid, version, heartbeat_seconds, position)
values (%(id)s, %(host)s, %(pid)s, %(version)s, %(heartbeat_seconds)s, %(position)s)
on conflict (id) do update
  set seen_at = now(), position = excluded.position;

-- name: gateway_beat
update realtime.gateways
set seen_at = now(), position = %(position)s, subscribers = %(subscribers)s
where id = %(id)s;

-- name: gateway_forget
delete from realtime.gateways where id = %(id)s;

-- name: first_event_after
-- The oldest event after a reader's position, and how long ago it was written (ids are
-- given in order after commit: see migration 0008).
select id, extract(epoch from clock_timestamp() - at)::float8 as age_seconds
from realtime.events
where id > %(after)s
order by id
limit 1;

-- name: dispatch_health
-- What a stuck process or a stopped expiry task leaves behind: offers past their expiry
-- and requests past their time to live (both beyond a grace period), and how long the
-- oldest event this process has not routed yet has been waiting.
select
  (select count(*) from public.session_assignments
   where status = 'offered'
     and offer_expires_at < now() - make_interval(secs => %(grace_seconds)s::int))::int
    as offers_past_expiry,
  (select count(*) from public.session_assignments
   where status = 'queued'
     and queued_at < now() - make_interval(secs => %(request_ttl_seconds)s::int + %(grace_seconds)s::int))::int
    as requests_past_ttl,
  coalesce((select extract(epoch from clock_timestamp() - e.at)::float8
            from realtime.events e where e.id > %(position)s order by e.id limit 1), 0)
    as unrouted_age_seconds,
  -- Events committed and not numbered yet (migration 0008): by their write time.
  coalesce((select extract(epoch from clock_timestamp() - min(e.at))::float8
            from realtime.events e where e.id is null), 0)
    as unsequenced_age_seconds,
  -- Live: the same rule as the audit's and the repair's (migration 0004).
  (select count(*) from realtime.gateways g where realtime.gateway_is_live(g))::int
    as gateways_live;
