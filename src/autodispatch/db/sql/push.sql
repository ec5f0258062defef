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
-- One sender at a time, in two steps: this short transaction takes the row (whoever
-- holds it now is busy: skip it), and a lease that lets the sender send outside any
-- transaction. A row whose lease is still running belongs to another sender.
select last_id, lease_owner, coalesce(lease_expires_at > now(), false) as leased
from realtime.push_cursor
where id = 1
for update skip locked;

-- name: push_cursor_exists
-- Not locked and not returned: another process holds it, or it is missing.
select exists (select 1 from realtime.push_cursor where id = 1) as present;

-- name: lease_push_cursor
update realtime.push_cursor
set lease_owner = %(owner)s::uuid,
    lease_expires_at = now() + make_interval(secs => %(seconds)s::double precision)
where id = 1;

-- name: renew_push_lease
update realtime.push_cursor
set lease_expires_at = now() + make_interval(secs => %(seconds)s::double precision)
where id = 1 and lease_owner = %(owner)s::uuid;

-- name: advance_push_cursor
-- Compare and set: only the lease holder moves the cursor, and only from where it read
-- the batch, so two senders never both advance (nor move it back).
update realtime.push_cursor
set last_id = %(last_id)s::bigint, lease_owner = null, lease_expires_at = null
where id = 1 and last_id = %(after)s::bigint
  and (lease_owner = %(owner)s::uuid or %(owner)s::uuid is null);

-- name: release_push_lease
update realtime.push_cursor
set lease_owner = null, lease_expires_at = null
where id = 1 and lease_owner = %(owner)s::uuid;

-- name: push_events_after
select id, at, table_name, type, record, old_record ->> 'status' as old_status,
       old_keys, new_keys
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
where id = %(subscription_id)s::uuid
returning failures;

-- name: push_gone
-- The push service says this subscription no longer exists (404/410), or it failed too
-- many times in a row: the browser subscribes again when its page is next opened.
delete from public.push_subscriptions where id = %(subscription_id)s::uuid;
