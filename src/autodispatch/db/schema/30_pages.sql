-- What the pages keep besides the requests: the feature flags mechanics' pages obey, session
-- chat, the receipts mechanics' pages post after each alert, Web Push subscriptions, and
-- probe pings (a harmless change a user may cause and see, to check delivery end to end).
-- Who may read them is in 40_visibility.sql; the API writes them only through the api.*
-- functions of 65_api_pages.sql (feature flags: api.set_feature_flag, 60_api_dispatch.sql).

-- ---------------------------------------------------------------------------
-- Feature flags: what every mechanic's page does when a new request arrives. Everyone
-- may read them; an admin sets them.
-- ---------------------------------------------------------------------------

create table public.feature_flags (
  key text primary key constraint feature_flags_key_check check (key ~ '^[a-z][a-z0-9_]{1,62}$'),
  enabled boolean not null default false,
  description text not null default '',
  updated_at timestamptz not null default now(),
  updated_by uuid references auth.users (id) on delete set null
);

insert into public.feature_flags (key, enabled, description) values
  ('mech_new_request_alerts', true, 'Alert mechanics when a new request arrives (gates every tier)'),
  ('mech_audio_alerts', true, 'Play a sound with a new-request alert'),
  ('mech_browser_notifications', true, 'Show a system notification with a new-request alert'),
  ('mech_visual_indicators', true, 'Badge the tab title and favicon with a new-request alert');

-- ---------------------------------------------------------------------------
-- Session chat: the customer and the accepted mechanic, nobody else (not even admins:
-- a consultation is private). The participants are fixed once a mechanic accepts, so a
-- message keeps the keys it was written with (visibility_keys, set by api.send_message).
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
