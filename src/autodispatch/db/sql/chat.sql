-- name: send_message
select api.send_message(%(session_id)s::uuid, %(body)s::text) as message_id;

-- name: message_by_id
select id, session_id, sender_id, sender_name, sender_role, body, created_at
from public.session_messages
where id = %(message_id)s::uuid;

-- name: chat_access
-- Whether the caller may see the session (a row at all) and takes part in it. The
-- mechanics row of the accepted mechanic is visible to that mechanic only, which is
-- all this needs: the customer is matched by customer_id.
select coalesce(s.customer_id = auth.uid() or m.user_id = auth.uid(), false) as participant
from public.sessions s
left join public.mechanics m on m.id = s.mechanic_id
where s.id = %(session_id)s::uuid;

-- name: messages_of_session
-- The newest messages (row-level security: the two participants only), oldest first.
select id, session_id, sender_id, sender_name, sender_role, body, created_at
from (
  select id, session_id, sender_id, sender_name, sender_role, body, created_at
  from public.session_messages
  where session_id = %(session_id)s::uuid
  order by created_at desc, id desc
  limit %(limit)s::int
) newest
order by created_at, id;
