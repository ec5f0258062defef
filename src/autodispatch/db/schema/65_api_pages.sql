-- The api.* functions the pages call besides dispatch: session chat, alert receipts, Web
-- Push subscriptions, probe pings (their tables: 30_pages.sql). Same rules as the dispatch
-- functions (60_api_dispatch.sql): they check the caller, run as the owner, and are the
-- only way the API writes these tables.

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
