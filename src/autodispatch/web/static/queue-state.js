// The mechanic's queue and what this browser remembers about it. No DOM here.
//
// QueueStore: the requests this mechanic may take, from a snapshot (GET
// /api/mechanic/queue) and row events. A removal, or any status but queued/offered,
// takes a request out. Each row keeps the id of the last event applied to it, so an
// older event never overwrites a newer state.
//
// AlertMemory (localStorage, per mechanic): which requests were already alerted, and
// the realtime cursor, so a page that was closed resumes where it stopped and a request
// is alerted once in this browser, not again after a reload or a reconnect.
//
// CatchUp (every page): "subscribe first, then read", when reads may overlap.

export const TAKEABLE = new Set(['queued', 'offered']);
const MEMORY_DAYS = 3;
const MEMORY_MAX = 1000;
const CURSOR_MAX_AGE_MS = 60 * 60 * 1000; // resume a closed page within an hour; else reload

export class QueueStore {
  constructor() {
    this.items = new Map();
    this.versions = new Map();
  }

  /** Replace everything by a snapshot (oldest first, as the API sends it). */
  applySnapshot(items) {
    const before = new Set(this.items.keys());
    this.items = new Map(items.filter((a) => TAKEABLE.has(a.status)).map((a) => [a.id, a]));
    this.versions = new Map();
    return {
      added: [...this.items.keys()].filter((id) => !before.has(id)),
      removed: [...before].filter((id) => !this.items.has(id)),
    };
  }

  /**
   * Apply one session_assignments event (the `data` of a postgres_changes payload).
   * Returns {kind: 'added'|'updated'|'removed'|'ignored', assignment}.
   */
  applyEvent(data) {
    const record = data.record && data.record.id ? data.record : null;
    const old = data.old_record && data.old_record.id ? data.old_record : null;
    const id = (record || old || {}).id;
    if (!id) return { kind: 'ignored', assignment: null };
    const version = typeof data.event_id === 'number' ? data.event_id : null;
    const last = this.versions.get(id);
    if (version !== null && last !== undefined && version <= last) {
      return { kind: 'ignored', assignment: this.items.get(id) || null };
    }
    if (version !== null) this.versions.set(id, version);
    if (data.type === 'DELETE' || !record || !TAKEABLE.has(record.status)) {
      const had = this.items.get(id);
      this.items.delete(id);
      return { kind: had ? 'removed' : 'ignored', assignment: had || record || old };
    }
    const had = this.items.has(id);
    this.items.set(id, record);
    return { kind: had ? 'updated' : 'added', assignment: record };
  }

  remove(id) {
    this.items.delete(id);
  }

  /** Oldest first (by queued_at, as the API orders them). */
  list() {
    return [...this.items.values()].sort((a, b) => String(a.queued_at || a.created_at)
      .localeCompare(String(b.queued_at || b.created_at)) || String(a.id).localeCompare(String(b.id)));
  }
}

/** The alert key: a request alerts once; an offer to this mechanic alerts once more. */
export function alertKey(assignment) {
  return assignment.status === 'offered'
    ? `offer:${assignment.id}:${assignment.offer_expires_at || ''}`
    : `request:${assignment.id}`;
}

export class AlertMemory {
  constructor(userId, storage = window.localStorage) {
    this.key = `autodispatch.mechanic.${userId}`;
    this.storage = storage;
    const stored = this._read();
    this.isNew = stored === null; // first time this mechanic opens the page in this browser
    this.state = stored || { alerted: {}, cursor: null, cursorAt: 0 };
    this.pendingWrite = null;
    if (this.isNew) this._write();
  }

  /** Write now (before the page goes away). */
  flush() {
    if (this.pendingWrite) {
      clearTimeout(this.pendingWrite);
      this.pendingWrite = null;
    }
    this._write();
  }

  /** Alerted here before (this tab or another, now or earlier)? */
  has(key) {
    const fresh = this._read();
    if (fresh) this.state.alerted = { ...fresh.alerted, ...this.state.alerted };
    return Object.prototype.hasOwnProperty.call(this.state.alerted, key);
  }

  /** Claim the alert: false when it was already claimed. */
  claim(keys) {
    const list = Array.isArray(keys) ? keys : [keys];
    if (this.has(list[0])) return false;
    const now = Date.now();
    for (const key of list) this.state.alerted[key] = now;
    this._write();
    return true;
  }

  /** A resumable cursor, or null when there is none or it is too old to be worth it. */
  get cursor() {
    const { cursor, cursorAt } = this.state;
    if (typeof cursor !== 'number' || Date.now() - (cursorAt || 0) > CURSOR_MAX_AGE_MS) return null;
    return cursor;
  }

  set cursor(value) {
    this.state.cursor = value;
    this.state.cursorAt = Date.now();
    this._writeSoon();
  }

  forgetCursor() {
    this.state.cursor = null;
    this._write();
  }

  _read() {
    try {
      const raw = this.storage.getItem(this.key);
      return raw ? JSON.parse(raw) : null;
    } catch {
      return null;
    }
  }

  _write() {
    const cutoff = Date.now() - MEMORY_DAYS * 86400 * 1000;
    const entries = Object.entries(this.state.alerted)
      .filter(([, at]) => at >= cutoff)
      .sort((a, b) => b[1] - a[1])
      .slice(0, MEMORY_MAX);
    this.state.alerted = Object.fromEntries(entries);
    try {
      this.storage.setItem(this.key, JSON.stringify(this.state));
    } catch {
      // storage full or blocked: memory still works for this page
    }
  }

  _writeSoon() {
    if (this.pendingWrite) return;
    this.pendingWrite = setTimeout(() => {
      this.pendingWrite = null;
      this._write();
    }, 250);
  }
}

/**
 * "Subscribe first, then read": after each (re)subscribe a page reads a snapshot and
 * re-applies on top of it the events that arrived while it loaded. A second subscribe
 * can come while the first read still loads (a rejoin): its read supersedes the first,
 * whose snapshot may be older than events already applied, so only the latest read is
 * applied and events are kept until it is.
 *
 *   const load = catchUp.begin();
 *   const snapshot = await read();
 *   const events = catchUp.finish(load); // null: a newer read owns the state
 */
export class CatchUp {
  constructor() {
    this.generation = 0;
    this.loading = null; // the generation whose read is in flight, or null
    this.buffered = [];
  }

  get active() {
    return this.loading !== null;
  }

  /** A read starts. Events noted before it are in its snapshot: they are not kept. */
  begin() {
    this.generation += 1;
    this.loading = this.generation;
    this.buffered = [];
    return this.generation;
  }

  /** An event arrived: kept (true) while a read loads, to be applied again on top. */
  note(event) {
    if (this.loading === null) return false;
    this.buffered.push(event);
    return true;
  }

  /**
   * The read of `generation` ended (loaded or failed): the events to apply on top, in
   * order, and the catch-up is over; or null when a newer read started meanwhile (this
   * one's result must be dropped, and events stay kept for the newer one).
   */
  finish(generation) {
    if (generation !== this.loading) return null;
    const events = this.buffered;
    this.buffered = [];
    this.loading = null;
    return events;
  }

  /** Is this read still the latest one? */
  isCurrent(generation) {
    return generation === this.generation;
  }
}
