-- 0007: the functions 0006 added to the realtime schema are not callable by the API's
-- roles. 0002 revoked EXECUTE on the schema's functions from PUBLIC, but that covers only
-- the functions that existed then; a function created later is executable by PUBLIC
-- again (the schema's missing USAGE grant was all that stood in the way).
revoke execute on all functions in schema realtime from public;
