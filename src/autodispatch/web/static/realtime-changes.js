// A channel's row events (postgres_changes): each handed out once, and the resume cursor.
//
// - Every row event carries `data.event_id`; the highest one is the cursor, which the
//   channel rejoins with (`autodispatch_resume_from`) so the server replays what was
//   missed. A cursor the server no longer has (`ResyncRequired`) is forgotten and
//   `onResync` tells the page to reload its data.
// - De-duplication by event id: an event already handled is never handed out again.
// realtime-channel.js owns the join; this module owns what the join resumes from.

const DEDUP_LIMIT = 5000;

export class ChangeFeed {
  /**
   * @param {object} options
   * @param {number|null} [options.cursor]      resume after this event id
   * @param {(data: object) => void} [options.onChange]  a row event (data of the payload)
   * @param {(cursor: number) => void} [options.onCursor]
   * @param {() => void} [options.onResync]     the cursor was too old: reload your data
   * @param {(message: string) => void} reportError  a handler failed
   */
  constructor(options, reportError) {
    this.cursor = options.cursor ?? null;
    this.onChange = options.onChange || (() => {});
    this.onCursor = options.onCursor || (() => {});
    this.onResync = options.onResync || (() => {});
    this.reportError = reportError;
    this.seen = new Set();
  }

  /** A postgres_changes payload. */
  receive(payload) {
    const data = payload && payload.data;
    if (!data) return;
    const id = typeof data.event_id === 'number' ? data.event_id : null;
    if (id !== null) {
      // One event may come as several frames, one per variant the bindings need (an
      // UPDATE for one binding, a DELETE for a filtered one): each is handled once.
      const seenKey = `${id}:${(payload.ids || []).join(',')}:${data.type}`;
      if (this.seen.has(seenKey)) return; // de-duplicated: handled once already
      this.seen.add(seenKey);
      if (this.seen.size > DEDUP_LIMIT) this.seen.delete(this.seen.values().next().value);
    }
    // Compare event types in one case, whatever a server sends.
    data.type = String(data.type || '').toUpperCase();
    try {
      this.onChange(data);
    } catch (error) {
      console.error('a realtime handler failed', error);
      this.reportError(`handler failed: ${error}`);
    }
    // A frame before the last of its event's frames ("partial") moves no cursor: cut off
    // there, the channel resumes from before the event and gets the rest.
    if (id !== null && !data.partial && (this.cursor === null || id > this.cursor)) {
      this.cursor = id;
      try {
        this.onCursor(id);
      } catch (error) {
        console.error('onCursor failed', error);
      }
    }
  }

  /** The server no longer has this cursor's history: the next join starts afresh. */
  forgetCursor() {
    this.cursor = null;
    this.seen.clear();
    try {
      this.onResync();
    } catch (error) {
      console.error('onResync failed', error);
    }
  }
}
