-- name: probe_ping
-- The ping as written (see api.probe_ping: not read back through row-level security).
select id, user_id, nonce, created_at from api.probe_ping(%(nonce)s::text);
