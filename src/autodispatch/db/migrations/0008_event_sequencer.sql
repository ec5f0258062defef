-- 0008: event ids are given after commit, by a sequencer, not inside the writer's commit.
--
-- Until now every transaction that wrote events took the row lock of realtime.stream at
-- commit (realtime.assign_id, 0002) and sent a NOTIFY, and held both through its WAL
-- flush: event-producing commits ran one at a time (0.16x the commits/s of the same
-- writes without the log, 32 writers, docs/decisions.md). Now a writer only inserts its
-- events, with no id; it takes no lock another writer needs and sends no NOTIFY.
--
-- realtime.sequence() gives ids to the events that have committed and have none yet, in
-- insert order (seq), continuing realtime.stream.last_id without a gap, in one short
-- transaction that only sequencers take the stream's row lock in; then one NOTIFY wakes
-- the readers. Every server process runs it after its own writes commit and on a short
-- timer (for writes made by SQL from elsewhere). What that keeps true:
--
-- - Gap-free: ids are handed out contiguously by one transaction at a time, and each
--   sequencing transaction commits all its ids at once, so a reader asking for "id >
--   cursor" sees a whole prefix of the log, never a hole that fills later.
-- - Per-row order: a transaction that changes a row another one changed first can only
--   write its event after that one committed (it waits for the row lock), so the earlier
--   event is committed, and sequenced, no later than the later one is inserted; ids
--   follow seq within a batch. A row's events get growing ids.
-- - An open writing transaction holds nothing back: its events get ids when it commits,
--   after those of transactions that committed first.
-- - Ids already handed out stay as they are: cursors from before this migration resume.

drop trigger events_assign_id on realtime.events;
drop function realtime.assign_id();

-- What the sequencer looks for: events that committed without an id.
create index events_unsequenced_idx on realtime.events (seq) where id is null;

-- Give ids to up to p_limit committed events that have none, oldest first; return how
-- many and the log's last id after. Cheap when there is nothing to do (no lock, no write).
create function realtime.sequence(p_limit int)
returns table (assigned int, last_id bigint)
language plpgsql security definer set search_path = '' as $$
declare
  v_last bigint;
  v_count int;
begin
  if not exists (select 1 from realtime.events e where e.id is null) then
    return query select 0, s.last_id from realtime.stream s where s.id = 1;
    return;
  end if;
  -- One sequencer at a time (other processes wait here, never writers); the next
  -- statement's snapshot is taken after the lock, so it sees what the last one assigned.
  select s.last_id into v_last from realtime.stream s where s.id = 1 for update;
  with todo as (
    select e.seq, v_last + row_number() over (order by e.seq) as new_id
    from realtime.events e
    where e.id is null
    order by e.seq
    limit p_limit
  )
  update realtime.events e set id = t.new_id from todo t where e.seq = t.seq;
  get diagnostics v_count = row_count;
  if v_count > 0 then
    update realtime.stream s set last_id = v_last + v_count where s.id = 1;
    perform pg_notify('autodispatch_events', (v_last + v_count)::text);
  end if;
  return query select v_count, v_last + v_count;
end
$$;

revoke execute on function realtime.sequence(int) from public;

-- realtime.prune (0002) is unchanged: it deletes numbered events only, which the
-- sequencer never updates, then takes the stream's row lock for a moment; it does not
-- hold that lock through its delete, so a long prune never holds delivery back.
