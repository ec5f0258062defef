-- name: save_push_subscription
select api.save_push_subscription(%(endpoint)s::text, %(p256dh)s::text, %(auth)s::text)
  as subscription_id;

-- name: push_subscription_by_id
select id, user_id, endpoint, created_at, last_sent_at, failures, last_error
from public.push_subscriptions
where id = %(subscription_id)s::uuid;

-- name: delete_push_subscription
select api.delete_push_subscription(%(endpoint)s::text) as deleted;

-- name: lock_push_cursor
-- One sender at a time: whoever holds this row sends; the others skip it and try later.
select last_id from realtime.push_cursor where id = 1 for update skip locked;

-- name: advance_push_cursor
update realtime.push_cursor set last_id = %(last_id)s::bigint where id = 1;

-- name: push_events_after
select id, at, table_name, type, record, old_keys, new_keys
from realtime.events
where id > %(after)s::bigint
order by id
limit %(limit)s::int;

-- name: push_alerts_enabled
-- A push is a system notification: sent only while alerts and notifications are on.
select coalesce(bool_and(enabled), false) as enabled
from public.feature_flags
where key in ('mech_new_request_alerts', 'mech_browser_notifications');

-- name: open_assignments_now
-- The requests among these that can still be taken, with who may take them now and
-- until when (an offer until it expires, a queued request until nobody took it in time).
select a.id, a.status, public.assignment_visibility_keys(a) as keys,
       case when a.status = 'offered' then a.offer_expires_at
            else a.queued_at + make_interval(secs => %(request_ttl_seconds)s::int)
       end as expires_at
from public.session_assignments a
where a.id = any(%(ids)s::uuid[]) and a.status in ('queued', 'offered');

-- name: push_subscriptions_for_keys
-- Every subscription whose user holds one of these keys (the function RLS uses).
select s.id, s.user_id, s.endpoint, s.p256dh, s.auth, k.keys
from public.push_subscriptions s
cross join lateral (select auth.principal_keys_for(s.user_id) as keys) k
where k.keys && %(keys)s::text[]
order by s.created_at, s.id;

-- name: push_delivered
update public.push_subscriptions
set last_sent_at = now(), failures = 0, last_error = null
where id = %(subscription_id)s::uuid;

-- name: push_failed
-- failures counts the failures since the last push that went through.
update public.push_subscriptions
set failures = failures + 1, last_error = %(error)s::text
where id = %(subscription_id)s::uuid;

-- name: push_gone
-- The push service says this subscription no longer exists (404/410).
delete from public.push_subscriptions where id = %(subscription_id)s::uuid;
