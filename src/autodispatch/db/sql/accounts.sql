-- name: insert_user
insert into auth.users (email, password_hash)
values (%(email)s, %(password_hash)s)
returning id, email, created_at;

-- name: insert_profile
insert into public.profiles (id, account_type, full_name)
values (%(id)s, %(account_type)s, %(full_name)s)
returning id, account_type, full_name, created_at;

-- name: insert_mechanic
insert into public.mechanics (user_id, workshop_id, display_name)
values (%(user_id)s, %(workshop_id)s, %(display_name)s)
returning id, user_id, workshop_id, display_name;

-- name: user_by_email
select u.id, u.email, u.password_hash, u.created_at, u.disabled_at, p.account_type, p.full_name
from auth.users u
join public.profiles p on p.id = u.id
where u.email = %(email)s;

-- name: user_by_id
select u.id, u.email, u.password_hash, u.created_at, u.disabled_at, p.account_type, p.full_name
from auth.users u
join public.profiles p on p.id = u.id
where u.id = %(id)s;

-- name: update_password_hash
update auth.users set password_hash = %(password_hash)s where id = %(id)s;

-- name: insert_refresh_token
insert into auth.refresh_tokens (token_hash, user_id, expires_at)
values (%(token_hash)s, %(user_id)s, now() + make_interval(secs => %(ttl_seconds)s));

-- name: use_refresh_token
-- A refresh token works once: using it revokes it (rotation).
update auth.refresh_tokens
set revoked_at = now()
where token_hash = %(token_hash)s and revoked_at is null and expires_at > now()
returning user_id;

-- name: revoke_refresh_tokens
update auth.refresh_tokens set revoked_at = now()
where user_id = %(user_id)s and revoked_at is null;

-- name: record_sign_in_failure
insert into auth.sign_in_failures (throttle_key) values (%(throttle_key)s);

-- name: recent_sign_in_failures
-- How many failures in the window, and when the oldest of them leaves it.
select count(*) as failures,
       ceil(extract(epoch from (min(failed_at) + make_interval(secs => %(window_seconds)s) - now())))::int
         as retry_after
from auth.sign_in_failures
where throttle_key = %(throttle_key)s
  and failed_at > now() - make_interval(secs => %(window_seconds)s);

-- name: clear_sign_in_failures
delete from auth.sign_in_failures where throttle_key = %(throttle_key)s;

-- name: prune_sign_in_failures
delete from auth.sign_in_failures where failed_at < now() - interval '1 day';

-- name: workshop_by_name
select id, name from public.workshops where name = %(name)s;

-- name: insert_workshop
insert into public.workshops (name) values (%(name)s)
on conflict (name) do update set name = excluded.name
returning id, name;

-- name: own_profile
select id, account_type, full_name from public.profiles where id = auth.uid();
