-- Operations: what `autodispatch audit` and `repair` read besides the data. Every `serve`
-- process (a realtime gateway: it reads the event log and pushes to its subscribers)
-- records a heartbeat here, so the audit can say which gateways run, how far each has read
-- the log and how many subscribers it holds, from SQL alone (the audit never talks to a
-- server). The audit's other checks read the catalog and the tables of the other files.
--
-- A process inserts its row when it starts, updates it every few seconds, and deletes it
-- when it stops cleanly. A row whose heartbeat stopped is a process that died (killed, out
-- of memory, a container restart): the audit reports it, `repair --apply` forgets it.

create table realtime.gateways (
  id uuid primary key,
  host text not null,
  pid integer not null,
  version text not null,
  started_at timestamptz not null default now(),
  seen_at timestamptz not null default now(),
  -- How often this process beats: a row not seen for three beats (and at least 30 s) is a
  -- stopped process (realtime.gateway_is_live below).
  heartbeat_seconds real not null constraint gateways_heartbeat_check check (heartbeat_seconds > 0),
  -- The highest event id the process had routed to its subscribers at seen_at.
  position bigint not null default 0,
  subscribers integer not null default 0 constraint gateways_subscribers_check check (subscribers >= 0)
);

-- The servers write it as the owner; no other role reads or writes it.
revoke all on realtime.gateways from public;

-- The one rule for "this gateway is alive", used by every process's live-gateways gauge,
-- by `autodispatch audit` and by `repair` alike: it beat within its last three beats, and
-- never less than 30 s (a short interval must not make a brief stall look like a death).
create function realtime.gateway_is_live(g realtime.gateways) returns boolean
language sql stable as $$
  select g.seen_at > now() - make_interval(secs => greatest(3 * g.heartbeat_seconds, 30))
$$;

revoke all on function realtime.gateway_is_live(realtime.gateways) from public;
