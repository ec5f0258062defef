// The Phoenix channels wire protocol as Supabase Realtime speaks it (vsn 1.0.0 JSON
// frames): the socket URL, frames in and out, the replies awaited by ref, and the
// heartbeat. It neither reconnects nor knows channels: realtime.js drives these pieces
// over one WebSocket, so the protocol reads apart from the connection's lifecycle.

const VSN = '1.0.0';

/** The websocket URL of this page's server. */
export function socketUrl(apikey, location = window.location) {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const query = new URLSearchParams({ apikey, vsn: VSN });
  return `${scheme}://${location.host}/realtime/v1/websocket?${query}`;
}

/** A push as sent: a join's ref is the join_ref of the channel's later pushes. */
export function encodeFrame(topic, event, payload, ref, joinRef) {
  return JSON.stringify({ topic, event, payload, ref, join_ref: joinRef });
}

/** A received frame; throws when the text is not JSON. */
export function decodeFrame(text) {
  return JSON.parse(text);
}

/** The pushes waiting for their phx_reply, by ref. */
export class PendingReplies {
  constructor() {
    this.pending = new Map(); // ref -> {resolve, timer}
  }

  /** Resolves with the reply payload, or {status: 'timeout'} after timeoutMs. */
  wait(ref, timeoutMs) {
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.pending.delete(ref);
        resolve({ status: 'timeout', response: {} });
      }, timeoutMs);
      this.pending.set(ref, { resolve, timer });
    });
  }

  /** Hand a reply to the push that awaits it; false when none does. */
  settle(ref, payload) {
    if (ref === null || !this.pending.has(ref)) return false;
    const { resolve, timer } = this.pending.get(ref);
    clearTimeout(timer);
    this.pending.delete(ref);
    resolve(payload);
    return true;
  }

  /** The socket is gone: every waiting push gets an error naming why. */
  failAll(why) {
    for (const { resolve, timer } of this.pending.values()) {
      clearTimeout(timer);
      resolve({ status: 'error', response: { reason: why } });
    }
    this.pending.clear();
  }
}

/** A heartbeat every interval; one left unanswered until the next means a dead socket. */
export class Heartbeat {
  constructor() {
    this.timer = null;
    this.ref = null; // the beat awaiting its answer
  }

  /**
   * @param {number} intervalMs
   * @param {object} hooks
   * @param {() => string} hooks.makeRef
   * @param {(text: string) => void} hooks.send   may throw (the socket is gone)
   * @param {() => void} hooks.onMissed           the last beat was never answered
   * @param {() => void} hooks.onSendFailed
   */
  start(intervalMs, { makeRef, send, onMissed, onSendFailed }) {
    clearInterval(this.timer);
    this.timer = setInterval(() => {
      if (this.ref !== null) {
        onMissed();
        return;
      }
      const ref = makeRef();
      this.ref = ref;
      try {
        send(JSON.stringify({ topic: 'phoenix', event: 'heartbeat', payload: {}, ref }));
      } catch {
        onSendFailed();
      }
    }, intervalMs);
  }

  stop() {
    clearInterval(this.timer);
    this.timer = null;
    this.ref = null;
  }

  /** A frame on the phoenix topic: the answer to the last beat when the refs match. */
  answered(ref) {
    if (ref !== null && ref === this.ref) this.ref = null;
  }
}
