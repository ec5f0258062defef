-- Accounts: users and their sign-in state (auth), the profile that says what kind of
-- account each is (customer, mechanic, admin), workshops and mechanics; and the caller of
-- the current transaction, as the API set it. What an account may see follows from these
-- rows (auth.principal_keys_for, 40_visibility.sql); a change to them is an event on
-- auth.principals (55_principal_changes.sql).

-- ---------------------------------------------------------------------------
-- The caller, as the API set it for this transaction (request.jwt.claims).
-- ---------------------------------------------------------------------------

create function auth.claims() returns jsonb
language sql stable as $$
  select coalesce(nullif(current_setting('request.jwt.claims', true), ''), '{}')::jsonb
$$;

create function auth.uid() returns uuid
language sql stable as $$
  select nullif(auth.claims() ->> 'sub', '')::uuid
$$;

create function auth.role() returns text
language sql stable as $$
  select coalesce(auth.claims() ->> 'role', 'anon')
$$;

revoke execute on function auth.claims(), auth.uid(), auth.role() from public;
grant execute on function auth.claims(), auth.uid(), auth.role() to anon, authenticated;

-- ---------------------------------------------------------------------------
-- Users and signing in
-- ---------------------------------------------------------------------------

-- A disabled user (disabled_at set) has only the key 'public' (row-level security then
-- shows them nothing private); signing in and refreshing are refused.
create table auth.users (
  id uuid primary key default gen_random_uuid(),
  email text not null,
  password_hash text not null,
  created_at timestamptz not null default now(),
  disabled_at timestamptz,
  constraint users_email_normalised check (email = lower(btrim(email)) and email ~ '^[^@\s]+@[^@\s]+$')
);
create unique index users_email_key on auth.users (email);

create table auth.refresh_tokens (
  token_hash text primary key,
  user_id uuid not null references auth.users (id) on delete cascade,
  created_at timestamptz not null default now(),
  expires_at timestamptz not null,
  revoked_at timestamptz
);
create index refresh_tokens_user_idx on auth.refresh_tokens (user_id);

create table auth.sign_in_failures (
  id bigint generated always as identity primary key,
  throttle_key text not null,
  failed_at timestamptz not null default now()
);
create index sign_in_failures_key_idx on auth.sign_in_failures (throttle_key, failed_at);

-- ---------------------------------------------------------------------------
-- Profiles, workshops, mechanics
-- ---------------------------------------------------------------------------

create table public.profiles (
  id uuid primary key references auth.users (id) on delete cascade,
  account_type text not null
    constraint profiles_account_type_check check (account_type in ('customer', 'mechanic', 'admin')),
  full_name text not null
    constraint profiles_full_name_check check (length(btrim(full_name)) between 1 and 200),
  created_at timestamptz not null default now()
);

create table public.workshops (
  id uuid primary key default gen_random_uuid(),
  name text not null constraint workshops_name_check check (length(btrim(name)) between 1 and 200),
  created_at timestamptz not null default now()
);
create unique index workshops_name_key on public.workshops (name);

-- A mechanic without a workshop takes requests from the general pool; one with a
-- workshop takes that workshop's requests as well.
create table public.mechanics (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null unique references public.profiles (id) on delete cascade,
  workshop_id uuid references public.workshops (id),
  display_name text not null
    constraint mechanics_display_name_check check (length(btrim(display_name)) between 1 and 200),
  created_at timestamptz not null default now()
);
