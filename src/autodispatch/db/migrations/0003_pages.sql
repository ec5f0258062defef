-- 0003: what the pages need. Session chat, the receipts mechanics' pages post after each
-- alert, Web Push subscriptions, and probe pings (a harmless change a user may cause and
-- see, to check delivery end to end). Same rules as before: one visibility function per
-- table used by both row-level security and the realtime router, writes only through
-- api.* functions.

-- ---------------------------------------------------------------------------
-- Session chat: the customer and the accepted mechanic, nobody else (not even admins:
-- a consultation is private). The participants are fixed once a mechanic accepts, so a
-- message keeps the keys it was written with.
-- ---------------------------------------------------------------------------
create table public.session_messages (
  id uuid primary key default gen_random_uuid(),
  session_id uuid not null references public.sessions (id) on delete cascade,
  sender_id uuid not null references public.profiles (id),
  sender_name text not null,
  sender_role text not null constraint session_messages_sender_role_check
    check (sender_role in ('customer', 'mechanic')),
  body text not null constraint session_messages_body_check check (length(btrim(body)) between 1 and 2000),
  created_at timestamptz not null default now(),
  visibility_keys text[] not null
);
create index session_messages_session_idx on public.session_messages (session_id, created_at);

create function public.message_visibility_keys(m public.session_messages) returns text[]
language sql immutable as $$
  select m.visibility_keys
$$;

-- ---------------------------------------------------------------------------
-- Alert receipts: after each alert a mechanic's page says which tiers worked, which
-- failed and why, and how long from commit to shown. Read by admins and the mechanic.
-- Each is about one session_assignments event the mechanic could see (the one that
-- brought the alert), so nobody can count alerts that never happened.
-- ---------------------------------------------------------------------------
-- The tiers of an alert and what each did. Every writer is held to this (a CHECK), so
-- the admin summary never meets a tier or a status it does not know.
create function public.alert_tiers_valid(p_tiers jsonb) returns boolean
language sql immutable as $$
  select jsonb_typeof(p_tiers) = 'object'
     and p_tiers <> '{}'::jsonb
     and not exists (
       select 1 from jsonb_each(p_tiers) t
       where t.key not in ('toast', 'sound', 'notification', 'title', 'favicon')
          or jsonb_typeof(t.value) <> 'object'
          or (t.value - 'status' - 'error') <> '{}'::jsonb
          or coalesce(t.value ->> 'status', '') not in ('shown', 'failed', 'disabled', 'unsupported')
          or jsonb_typeof(coalesce(t.value -> 'error', 'null')) not in ('string', 'null')
          or length(t.value ->> 'error') > 500)
$$;

create table public.alert_receipts (
  id uuid primary key default gen_random_uuid(),
  mechanic_user_id uuid not null references public.profiles (id) on delete cascade,
  assignment_id uuid references public.session_assignments (id) on delete set null,
  event_id bigint not null,
  -- {"toast": {"status": "shown", "error": null}, "sound": {"status": "failed", "error": "..."}}
  tiers jsonb not null constraint alert_receipts_tiers_check check (public.alert_tiers_valid(tiers)),
  commit_to_shown_ms double precision
    constraint alert_receipts_latency_check check (commit_to_shown_ms is null or commit_to_shown_ms >= 0),
  created_at timestamptz not null default now()
);
create index alert_receipts_created_idx on public.alert_receipts (created_at);
-- One receipt per mechanic per alerted event: a page that retries does not count twice.
create unique index alert_receipts_once_idx on public.alert_receipts (mechanic_user_id, event_id);

-- ---------------------------------------------------------------------------
-- Web Push subscriptions, per user (the browser's endpoint and its keys).
-- ---------------------------------------------------------------------------
create table public.push_subscriptions (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references public.profiles (id) on delete cascade,
  endpoint text not null unique
    -- The shape every writer is held to: https, a plain host (letters, digits, dots,
    -- hyphens; an optional port; no user info), no spaces. Which hosts the server may
    -- reach depends on DNS and a setting, so the API checks that when a subscription is
    -- saved and the sender again on every connection (api/push_network.py).
    constraint push_subscriptions_endpoint_check check (
      endpoint ~ '^https://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[^[:space:][:cntrl:]]*)?$'
      and length(endpoint) <= 2000),
  p256dh text not null constraint push_subscriptions_p256dh_check check (length(p256dh) between 1 and 200),
  auth text not null constraint push_subscriptions_auth_check check (length(auth) between 1 and 100),
  created_at timestamptz not null default now(),
  last_sent_at timestamptz,
  last_error text,
  failures int not null default 0
);
create index push_subscriptions_user_idx on public.push_subscriptions (user_id);

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
insert into realtime.push_cursor (id, last_id) select 1, last_id from realtime.stream;

-- ---------------------------------------------------------------------------
-- Probe pings: a row only its author may see, written on demand, so a user (or the
-- probe command, or the /probe page) can check that a change they may see reaches them.
-- ---------------------------------------------------------------------------
create table public.probe_pings (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references public.profiles (id) on delete cascade,
  nonce text not null constraint probe_pings_nonce_check check (length(nonce) between 1 and 100),
  created_at timestamptz not null default now()
);
create index probe_pings_user_idx on public.probe_pings (user_id, created_at);

create function public.probe_visibility_keys(p public.probe_pings) returns text[]
language sql immutable as $$
  select array['user:' || p.user_id]
$$;

alter table public.session_messages enable row level security;
alter table public.alert_receipts enable row level security;
alter table public.push_subscriptions enable row level security;
alter table public.probe_pings enable row level security;

create policy session_messages_visible on public.session_messages for select to anon, authenticated
  using (public.message_visibility_keys(session_messages) && (select auth.principal_keys()));
create policy alert_receipts_visible on public.alert_receipts for select to anon, authenticated
  using (public.owner_visibility_keys(mechanic_user_id) && (select auth.principal_keys()));
create policy push_subscriptions_visible on public.push_subscriptions for select to anon, authenticated
  using (public.owner_visibility_keys(user_id) && (select auth.principal_keys()));
create policy probe_pings_visible on public.probe_pings for select to anon, authenticated
  using (public.probe_visibility_keys(probe_pings) && (select auth.principal_keys()));

grant select on public.session_messages, public.alert_receipts, public.push_subscriptions,
  public.probe_pings to anon, authenticated;

-- ---------------------------------------------------------------------------
-- The event log captures chat and probe pings too.
-- ---------------------------------------------------------------------------
create or replace function realtime.capture() returns trigger
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

create trigger a_realtime_capture after insert or update or delete on public.session_messages
  for each row execute function realtime.capture();
create trigger a_realtime_capture after insert or update or delete on public.probe_pings
  for each row execute function realtime.capture();

-- ---------------------------------------------------------------------------
-- api.*
-- ---------------------------------------------------------------------------

-- A chat message from a participant, while the session runs (from acceptance until it
-- ends). Returns the message id.
create function api.send_message(p_session_id uuid, p_body text) returns uuid
language plpgsql security definer set search_path = '' as $$
declare
  v_caller public.profiles := api.caller(array['customer', 'mechanic']);
  v_session public.sessions := api.lock_session(p_session_id);
  v_mechanic public.mechanics;
  v_id uuid;
begin
  select * into v_mechanic from public.mechanics where id = v_session.mechanic_id;
  -- coalesce: before acceptance there is no mechanic, and "false or null" is not false.
  if not coalesce(v_session.customer_id = v_caller.id or v_mechanic.user_id = v_caller.id, false) then
    perform api.fail(403, 'not_a_participant',
                     'only the customer and the mechanic who accepted this session may chat in it');
  end if;
  if v_session.status not in ('waiting', 'live') or v_session.mechanic_id is null then
    perform api.fail(409, 'chat_closed',
                     format('chat is open from acceptance until the session ends; this session is %s%s',
                            v_session.status,
                            case when v_session.mechanic_id is null then ' and no mechanic has accepted it'
                                 else '' end));
  end if;
  if p_body is null or length(btrim(p_body)) not between 1 and 2000 then
    perform api.fail(422, 'invalid_message', 'a message needs 1 to 2000 characters of text');
  end if;
  insert into public.session_messages (session_id, sender_id, sender_name, sender_role, body, visibility_keys)
  values (v_session.id, v_caller.id,
          case when v_caller.account_type = 'mechanic' then v_mechanic.display_name else v_caller.full_name end,
          v_caller.account_type, btrim(p_body),
          array['user:' || v_session.customer_id, 'mechanic:' || v_session.mechanic_id])
  returning id into v_id;
  return v_id;
end
$$;

-- A mechanic's page reports an alert: the event that brought it, or, for an alert the
-- page raised from a queue read (no event in hand), the assignment, whose event is then
-- the latest that gave the caller a key to it. The event must be a session_assignments
-- event the caller could see (its new or old keys and the caller's overlap); anything
-- else is "not found", whether it exists or not. The same event reported twice keeps the
-- first; `created` says which happened, so the caller counts each alert once.
create function api.record_alert_receipt(
  p_assignment_id uuid, p_event_id bigint, p_tiers jsonb, p_commit_to_shown_ms double precision,
  out receipt_id uuid, out created boolean
)
language plpgsql security definer set search_path = '' as $$
declare
  v_caller public.profiles := api.caller(array['mechanic']);
  v_keys text[] := auth.principal_keys();
  v_event realtime.events;
  v_assignment_id uuid;
  v_id uuid;
begin
  if p_tiers is null or not public.alert_tiers_valid(p_tiers) then
    perform api.fail(422, 'invalid_receipt',
                     'tiers must map toast, sound, notification, title or favicon to'
                     || ' {"status": "shown" | "failed" | "disabled" | "unsupported", "error"?: text}');
  end if;
  if p_commit_to_shown_ms is not null and not p_commit_to_shown_ms between 0 and 86400000 then
    perform api.fail(422, 'invalid_receipt', 'commit_to_shown_ms must be from 0 to 86400000');
  end if;
  if p_event_id is null and p_assignment_id is null then
    perform api.fail(422, 'invalid_receipt', 'a receipt names the alert''s event_id (or its assignment_id)');
  end if;
  if p_event_id is not null then
    select * into v_event from realtime.events e
    where e.id = p_event_id and e.table_name = 'session_assignments'
      and (e.new_keys && v_keys or e.old_keys && v_keys);
  else
    -- The latest event that gave the caller a key to this assignment: queued where they
    -- may take it, or offered to them (the two alerts a page raises). Only the events
    -- since the assignment was made are read: a short range of events_at_idx.
    select * into v_event from realtime.events e
    where e.at >= (select a.created_at from public.session_assignments a where a.id = p_assignment_id)
      and e.table_name = 'session_assignments' and e.row_id = p_assignment_id::text
      and exists (select 1 from unnest(e.new_keys) k where k = any (v_keys) and k <> all (e.old_keys))
    order by e.id desc limit 1;
  end if;
  if v_event.id is null or (p_assignment_id is not null and v_event.row_id <> p_assignment_id::text) then
    perform api.fail(404, 'alert_event_not_found',
                     'no request event you could see has this event_id and assignment_id');
  end if;
  -- The assignment as of the event; null when it has since been deleted.
  select a.id into v_assignment_id from public.session_assignments a where a.id = v_event.row_id::uuid;
  insert into public.alert_receipts (mechanic_user_id, assignment_id, event_id, tiers, commit_to_shown_ms)
  values (v_caller.id, v_assignment_id, v_event.id, p_tiers, p_commit_to_shown_ms)
  on conflict (mechanic_user_id, event_id) do nothing
  returning id into v_id;
  created := v_id is not null;
  if v_id is null then
    select id into v_id from public.alert_receipts
    where mechanic_user_id = v_caller.id and event_id = v_event.id;
  end if;
  receipt_id := v_id;
end
$$;

-- A browser's push subscription for the calling mechanic; the same endpoint again
-- replaces its keys (and moves it to this account: one browser, one signed-in user).
-- A mechanic keeps at most 10: the one least recently used (last push delivered, else
-- saved) makes room. Refusing the eleventh instead would lock out a mechanic whose old
-- browsers are gone, since only a browser knows its endpoint to delete it.
create function api.save_push_subscription(p_endpoint text, p_p256dh text, p_auth text) returns uuid
language plpgsql security definer set search_path = '' as $$
declare
  v_caller public.profiles := api.caller(array['mechanic']);
  v_id uuid;
begin
  -- One save per user at a time, so two saves cannot both miss the other's row.
  perform pg_advisory_xact_lock(hashtextextended('push_subscriptions:' || v_caller.id, 0));
  insert into public.push_subscriptions (user_id, endpoint, p256dh, auth)
  values (v_caller.id, p_endpoint, p_p256dh, p_auth)
  on conflict (endpoint) do update
    set user_id = excluded.user_id, p256dh = excluded.p256dh, auth = excluded.auth,
        created_at = now(), failures = 0, last_error = null
  returning id into v_id;
  delete from public.push_subscriptions
  where id in (select s.id from public.push_subscriptions s
               where s.user_id = v_caller.id and s.id <> v_id
               order by coalesce(s.last_sent_at, s.created_at) desc, s.id desc
               offset 9);
  return v_id;
end
$$;

create function api.delete_push_subscription(p_endpoint text) returns boolean
language plpgsql security definer set search_path = '' as $$
declare
  v_caller public.profiles := api.caller(array['customer', 'mechanic', 'admin']);
begin
  delete from public.push_subscriptions where endpoint = p_endpoint and user_id = v_caller.id;
  return found;
end
$$;

-- A probe ping for the caller; the caller's pings older than a day are dropped. Returns
-- the row as written, not as read back through row-level security: when a broken
-- visibility rule hides it, the write still reports success and the probe shows that
-- the event, not the write, went missing.
create function api.probe_ping(p_nonce text) returns public.probe_pings
language plpgsql security definer set search_path = '' as $$
declare
  v_caller public.profiles := api.caller(array['customer', 'mechanic', 'admin']);
  v_ping public.probe_pings;
begin
  if p_nonce is null or length(p_nonce) not between 1 and 100 then
    perform api.fail(422, 'invalid_nonce', 'nonce must be 1 to 100 characters');
  end if;
  delete from public.probe_pings where user_id = v_caller.id and created_at < now() - interval '1 day';
  insert into public.probe_pings (user_id, nonce) values (v_caller.id, p_nonce)
  returning * into v_ping;
  return v_ping;
end
$$;

revoke execute on function
  api.send_message(uuid, text),
  api.record_alert_receipt(uuid, bigint, jsonb, double precision),
  api.save_push_subscription(text, text, text),
  api.delete_push_subscription(text),
  api.probe_ping(text)
from public;
grant execute on function
  api.send_message(uuid, text),
  api.record_alert_receipt(uuid, bigint, jsonb, double precision),
  api.save_push_subscription(text, text, text),
  api.delete_push_subscription(text),
  api.probe_ping(text)
to authenticated;
