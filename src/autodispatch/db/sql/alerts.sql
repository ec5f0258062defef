-- name: record_alert_receipt
select receipt_id, created
from api.record_alert_receipt(
  %(assignment_id)s::uuid, %(event_id)s::bigint, %(tiers)s::jsonb,
  %(commit_to_shown_ms)s::double precision
);

-- name: alert_receipt_by_id
select id, mechanic_user_id, assignment_id, event_id, tiers, commit_to_shown_ms, created_at
from public.alert_receipts
where id = %(receipt_id)s::uuid;

-- name: alert_tier_counts
-- Per tier and status, the alerts reported in the window (what the caller may see).
select t.key as tier, t.value ->> 'status' as status, count(*)::int as alerts
from public.alert_receipts r
cross join lateral jsonb_each(r.tiers) t
where r.created_at > now() - make_interval(mins => %(minutes)s::int)
group by 1, 2;

-- name: alert_latency
select count(commit_to_shown_ms)::int as count,
       percentile_cont(0.5) within group (order by commit_to_shown_ms) as p50,
       percentile_cont(0.95) within group (order by commit_to_shown_ms) as p95,
       percentile_cont(0.99) within group (order by commit_to_shown_ms) as p99
from public.alert_receipts
where created_at > now() - make_interval(mins => %(minutes)s::int)
  and commit_to_shown_ms is not null;

-- name: alert_recent_failures
select t.key as tier, t.value ->> 'error' as error, r.created_at as at,
       coalesce(m.display_name, p.full_name) as mechanic
from public.alert_receipts r
cross join lateral jsonb_each(r.tiers) t
left join public.mechanics m on m.user_id = r.mechanic_user_id
left join public.profiles p on p.id = r.mechanic_user_id
where r.created_at > now() - make_interval(mins => %(minutes)s::int)
  and t.value ->> 'status' = 'failed'
order by r.created_at desc, t.key
limit %(limit)s::int;
