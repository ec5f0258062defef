-- Roles and schemas: who the API runs as, and the namespaces everything else lives in.
--
-- This directory is the whole current schema, one file per concern, loaded in name order
-- into an empty database by autodispatch.db.migrate.load_schema. The migrations
-- (db/migrations) build the same database step by step; tests/db/test_schema_files.py holds the
-- two equal, so a migration that changes the schema changes these files too.
--
-- Errors raised by the database use SQLSTATE 'AD' || <http status> and put a stable code
-- in the HINT; autodispatch.db.errors maps them to the API's errors.

-- auth: the accounts and who is calling; api: the functions through which the API
-- changes state; realtime: the event log and what reads it, closed to the API's roles.
-- public holds the data, read through row-level security.
create schema auth;
create schema api;
create schema realtime;

-- The roles the API switches to for each request (SET LOCAL ROLE). Roles belong to the
-- cluster, not to one database: create them only where they do not exist yet.
do $$
begin
  if not exists (select from pg_roles where rolname = 'anon') then
    create role anon nologin noinherit;
  end if;
  if not exists (select from pg_roles where rolname = 'authenticated') then
    create role authenticated nologin noinherit;
  end if;
end
$$;
-- The role that owns the schema (and that the server connects as) may switch to them.
grant anon, authenticated to current_user;

grant usage on schema public, auth, api to anon, authenticated;
-- No role but the owner uses the realtime schema (the servers read and write the log as
-- its owner). Its functions are revoked from PUBLIC one by one as well, so that neither
-- this nor that alone keeps the API's roles out.
revoke all on schema realtime from public;
