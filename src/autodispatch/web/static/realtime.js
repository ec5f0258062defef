// A small client for our realtime server: the Supabase Realtime protocol (Phoenix
// channels, vsn 1.0.0 JSON frames) plus our resume extension.
//
// - One socket, many channels. Each channel joins with `postgres_changes` bindings (and
//   presence when asked), is "subscribed" only once the server says "Subscribed to
//   PostgreSQL", and rejoins by itself after any disconnect.
// - Resume: every row event carries `data.event_id`; the channel keeps the highest one
//   as its cursor and rejoins with `autodispatch_resume_from: cursor`, so the server
//   replays what was missed. A cursor the server no longer has (`ResyncRequired`) is
//   dropped and `onResync` tells the page to reload its data.
// - De-duplication by event id: an event already handled is never handed out again.
// - Heartbeats; a heartbeat left unanswered closes the socket. Reconnects back off
//   exponentially with jitter, and go at once when the browser comes back online.
// - `setAccessToken` sends a fresh token to every joined channel (`access_token`).
// - Presence: the server decides under which key a page is listed (it may ignore the
//   key a page asks for). A channel tags what it tracks with a random `client_ref` and
//   learns its key by finding that tag in presence_state / presence_diff.

const VSN = '1.0.0';
const DEDUP_LIMIT = 5000;

export const PHASE = Object.freeze({
  CONNECTING: 'connecting', // first connection attempt
  LIVE: 'live', // socket open and every channel subscribed
  JOINING: 'joining', // socket open, a channel not yet subscribed
  RECONNECTING: 'reconnecting', // waiting before the next attempt
  OFFLINE: 'offline', // the browser says it has no network
  CLOSED: 'closed', // disconnect() was called
});

/** Full-jitter-ish exponential backoff: half fixed, half random. */
export function backoffDelay(attempt, baseMs = 500, capMs = 15000, random = Math.random) {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.max(0, attempt));
  return Math.round(ceiling / 2 + random() * (ceiling / 2));
}

/** The websocket URL of this page's server. */
export function socketUrl(apikey, location = window.location) {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const query = new URLSearchParams({ apikey, vsn: VSN });
  return `${scheme}://${location.host}/realtime/v1/websocket?${query}`;
}

export class RealtimeSocket {
  /**
   * @param {object} options
   * @param {string} options.url            websocket URL (see socketUrl)
   * @param {() => string|null} options.token the current access token (null: anonymous)
   * @param {(state: object) => void} [options.onState]
   * @param {(entry: object) => void} [options.log]
   */
  constructor({ url, token, onState = () => {}, log = () => {}, heartbeatMs = 25000,
    joinTimeoutMs = 10000, backoffBaseMs = 500, backoffCapMs = 15000 }) {
    this.url = url;
    this.token = token;
    this.onState = onState;
    this.log = log;
    this.heartbeatMs = heartbeatMs;
    this.joinTimeoutMs = joinTimeoutMs;
    this.backoffBaseMs = backoffBaseMs;
    this.backoffCapMs = backoffCapMs;
    this.channels = new Map();
    this.ws = null;
    this.ref = 0;
    this.pending = new Map(); // ref -> {resolve, timer}
    this.attempt = 0;
    this.stopped = true;
    this.phase = PHASE.CLOSED;
    this.downSince = Date.now(); // not live since (null while live)
    this.openedAt = null; // when the current socket opened (null while there is none)
    this.retryTimer = null;
    this.heartbeatTimer = null;
    this.heartbeatRef = null;
    this.nextRetryAt = null;
    this._onOnline = () => this._online();
    this._onOffline = () => this._offline();
  }

  channel(name, options) {
    const channel = new Channel(this, `realtime:${name}`, options);
    this.channels.set(channel.topic, channel);
    if (this.isOpen()) channel.join();
    return channel;
  }

  removeChannel(channel) {
    this.channels.delete(channel.topic);
    channel.leave();
  }

  connect() {
    if (!this.stopped) return;
    this.stopped = false;
    window.addEventListener('online', this._onOnline);
    window.addEventListener('offline', this._onOffline);
    this._setPhase(PHASE.CONNECTING);
    this._open();
  }

  disconnect() {
    this.stopped = true;
    window.removeEventListener('online', this._onOnline);
    window.removeEventListener('offline', this._onOffline);
    clearTimeout(this.retryTimer);
    this._teardown('client disconnect');
    this._setPhase(PHASE.CLOSED);
  }

  /** Reconnect now (e.g. a "Retry now" button), skipping the backoff wait. */
  reconnectNow() {
    if (this.stopped) return;
    clearTimeout(this.retryTimer);
    this.attempt = 0;
    this._teardown('manual reconnect');
    this._open();
  }

  setAccessToken(token) {
    for (const channel of this.channels.values()) {
      if (channel.state === 'joined' || channel.state === 'subscribed') {
        this.push(channel.topic, 'access_token', { access_token: token },
          { joinRef: channel.joinRef, awaitReply: false });
      }
    }
  }

  makeRef() {
    this.ref += 1;
    return String(this.ref);
  }

  isOpen() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  // -- sending ------------------------------------------------------------------------

  /** Send a message; resolves with the reply payload (or null when no reply is awaited). */
  push(topic, event, payload, { joinRef = null, ref = null, awaitReply = true,
    timeoutMs = this.joinTimeoutMs } = {}) {
    if (!this.isOpen()) return Promise.resolve({ status: 'error', response: { reason: 'not connected' } });
    ref = ref ?? this.makeRef();
    this.ws.send(JSON.stringify({ topic, event, payload, ref, join_ref: joinRef }));
    if (!awaitReply) return Promise.resolve(null);
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.pending.delete(ref);
        resolve({ status: 'timeout', response: {} });
      }, timeoutMs);
      this.pending.set(ref, { resolve, timer });
    });
  }

  // -- connection ---------------------------------------------------------------------

  _open() {
    if (this.stopped) return;
    if (navigator.onLine === false) {
      this._setPhase(PHASE.OFFLINE);
      return;
    }
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (error) {
      this.log({ kind: 'error', message: `could not open the socket: ${error}` });
      this._scheduleReconnect();
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      this.log({ kind: 'socket', message: 'connected' });
      this.openedAt = Date.now();
      this._setPhase(PHASE.JOINING);
      this._startHeartbeat();
      for (const channel of this.channels.values()) channel.join();
    };
    ws.onmessage = (message) => {
      if (this.ws !== ws) return;
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch {
        this.log({ kind: 'error', message: 'a frame that is not JSON was ignored' });
        return;
      }
      this._receive(frame);
    };
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this.log({ kind: 'socket', message: `closed (${event.code}${event.reason ? `: ${event.reason}` : ''})` });
      this._teardown('socket closed');
      this._scheduleReconnect();
    };
    ws.onerror = () => {
      // onclose follows; nothing else to do.
    };
  }

  _teardown(why) {
    clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = null;
    this.heartbeatRef = null;
    for (const { resolve, timer } of this.pending.values()) {
      clearTimeout(timer);
      resolve({ status: 'error', response: { reason: why } });
    }
    this.pending.clear();
    const ws = this.ws;
    this.ws = null;
    this.openedAt = null;
    for (const channel of this.channels.values()) channel.socketDown();
    if (ws && ws.readyState <= WebSocket.OPEN) {
      try {
        ws.close(1000, why.slice(0, 100));
      } catch {
        // already closing
      }
    }
    if (this.phase === PHASE.LIVE) this.downSince = Date.now();
  }

  _scheduleReconnect() {
    if (this.stopped) return;
    if (navigator.onLine === false) {
      this._setPhase(PHASE.OFFLINE);
      return;
    }
    const delay = backoffDelay(this.attempt, this.backoffBaseMs, this.backoffCapMs);
    this.attempt += 1;
    this.nextRetryAt = Date.now() + delay;
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => {
      this.nextRetryAt = null;
      this._open();
    }, delay);
    this._setPhase(PHASE.RECONNECTING);
  }

  _online() {
    if (this.stopped) return;
    this.log({ kind: 'socket', message: 'the browser is online again' });
    this.attempt = 0;
    if (!this.ws) {
      clearTimeout(this.retryTimer);
      this._open();
    }
  }

  _offline() {
    if (this.stopped) return;
    this.log({ kind: 'socket', message: 'the browser went offline' });
    clearTimeout(this.retryTimer);
    this._teardown('offline');
    this._setPhase(PHASE.OFFLINE);
  }

  _startHeartbeat() {
    clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = setInterval(() => {
      if (this.heartbeatRef !== null) {
        // The last heartbeat was never answered: the connection is dead.
        this.log({ kind: 'error', message: 'heartbeat unanswered: reconnecting' });
        this._teardown('heartbeat timeout');
        this._scheduleReconnect();
        return;
      }
      const ref = this.makeRef();
      this.heartbeatRef = ref;
      try {
        this.ws.send(JSON.stringify({ topic: 'phoenix', event: 'heartbeat', payload: {}, ref }));
      } catch {
        this._teardown('heartbeat send failed');
        this._scheduleReconnect();
      }
    }, this.heartbeatMs);
  }

  _receive(frame) {
    const { topic, event, payload, ref } = frame;
    if (topic === 'phoenix') {
      if (ref !== null && ref === this.heartbeatRef) this.heartbeatRef = null;
      return;
    }
    if (event === 'phx_reply' && ref !== null && this.pending.has(ref)) {
      const { resolve, timer } = this.pending.get(ref);
      clearTimeout(timer);
      this.pending.delete(ref);
      resolve(payload);
      return;
    }
    const channel = this.channels.get(topic);
    if (channel) channel.receive(frame);
  }

  // -- state --------------------------------------------------------------------------

  channelStateChanged() {
    if (!this.isOpen()) return;
    const all = [...this.channels.values()];
    if (all.length > 0 && all.every((c) => c.state === 'subscribed')) {
      this.attempt = 0;
      this.downSince = null;
      this._setPhase(PHASE.LIVE);
    } else {
      if (this.phase === PHASE.LIVE) this.downSince = Date.now();
      this._setPhase(PHASE.JOINING);
    }
  }

  _setPhase(phase) {
    if (phase !== PHASE.LIVE && this.downSince === null) this.downSince = Date.now();
    this.phase = phase;
    try {
      this.onState({
        phase,
        attempt: this.attempt,
        downSince: this.downSince,
        nextRetryAt: this.nextRetryAt,
      });
    } catch (error) {
      console.error('realtime onState callback failed', error);
    }
  }
}

/** Phoenix presence, as a plain object: {key: {metas: [...]}}. */
export class PresenceState {
  constructor() {
    this.state = {};
  }

  syncState(state) {
    this.state = {};
    for (const [key, value] of Object.entries(state || {})) {
      this.state[key] = { metas: [...(value.metas || [])] };
    }
  }

  syncDiff({ joins = {}, leaves = {} }) {
    for (const [key, value] of Object.entries(joins)) {
      const current = this.state[key] || { metas: [] };
      const refs = new Set(current.metas.map((m) => m.phx_ref));
      const added = (value.metas || []).filter((m) => !refs.has(m.phx_ref));
      this.state[key] = { metas: [...current.metas, ...added] };
    }
    for (const [key, value] of Object.entries(leaves)) {
      const current = this.state[key];
      if (!current) continue;
      const gone = new Set((value.metas || []).map((m) => m.phx_ref));
      const metas = current.metas.filter((m) => !gone.has(m.phx_ref));
      if (metas.length) this.state[key] = { metas };
      else delete this.state[key];
    }
  }

  /** The key under which a meta matching `predicate` is listed, or null. */
  findKey(predicate) {
    for (const [key, value] of Object.entries(this.state)) {
      if (value.metas.some(predicate)) return key;
    }
    return null;
  }

  /** [{key, metas}] sorted by key. */
  list() {
    return Object.keys(this.state)
      .sort()
      .map((key) => ({ key, metas: this.state[key].metas }));
  }
}

class Channel {
  /**
   * @param {object} options
   * @param {Array<object>} [options.changes]   postgres_changes bindings
   * @param {{key?: string, meta: object}|null} [options.presence]  track this presence
   *   (`key` is only a wish: the server may list it under another; see presenceKey)
   * @param {boolean} [options.watchPresence]   receive presence_state / presence_diff
   * @param {number|null} [options.cursor]      resume after this event id
   * @param {(data: object) => void} [options.onChange]  a row event (data of the payload)
   * @param {(presence: PresenceState) => void} [options.onPresence]
   * @param {(status: string, detail?: string) => void} [options.onStatus]
   * @param {() => void} [options.onResync]     the cursor was too old: reload your data
   * @param {(cursor: number) => void} [options.onCursor]
   * @param {() => Promise<void>} [options.onTokenRejected]  refresh the token, then rejoin
   */
  constructor(socket, topic, options = {}) {
    this.socket = socket;
    this.topic = topic;
    this.changes = options.changes || [];
    this.presence = options.presence || null;
    this.watchPresence = Boolean(options.watchPresence || options.presence);
    this.cursor = options.cursor ?? null;
    this.onChange = options.onChange || (() => {});
    this.onPresence = options.onPresence || (() => {});
    this.onStatus = options.onStatus || (() => {});
    this.onResync = options.onResync || (() => {});
    this.onCursor = options.onCursor || (() => {});
    this.onTokenRejected = options.onTokenRejected || (async () => {});
    this.state = 'closed';
    this.joinRef = null;
    this.seen = new Set();
    this.presenceState = new PresenceState();
    this.clientRef = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
    this.rejoinTimer = null;
    this.rejoinAttempt = 0;
    this.left = false;
  }

  async join() {
    if (this.left || !this.socket.isOpen()) return;
    clearTimeout(this.rejoinTimer);
    this._setState('joining');
    const payload = {
      config: {
        broadcast: { ack: false, self: false },
        presence: { enabled: this.watchPresence, key: (this.presence && this.presence.key) || '' },
        postgres_changes: this.changes,
        private: false,
      },
    };
    const token = this.socket.token();
    if (token) payload.access_token = token;
    if (this.cursor !== null) payload.autodispatch_resume_from = this.cursor;
    const ref = this.socket.makeRef();
    this.joinRef = ref; // Phoenix: a join's ref is the join_ref of the channel's pushes
    const ws = this.socket.ws;
    const reply = await this.socket.push(this.topic, 'phx_join', payload, { joinRef: ref, ref });
    // Superseded by a newer join, or the socket went away: its successor joins afresh.
    if (this.joinRef !== ref || this.left || this.socket.ws !== ws) return;
    if (reply.status === 'ok') {
      this.rejoinAttempt = 0;
      this.socket.log({ kind: 'join', topic: this.topic, message: this.cursor !== null
        ? `joined, resuming after event ${this.cursor}` : 'joined' });
      if (this.changes.length === 0) this._setState('subscribed');
      else this._setState('joined');
      if (this.presence) this.track(this.presence.meta);
      return;
    }
    const reason = (reply.response && reply.response.reason) || reply.status;
    this.socket.log({ kind: 'error', topic: this.topic, message: `join refused: ${reason}` });
    if (String(reason).startsWith('ResyncRequired')) {
      this._forgetCursor();
      this.join();
      return;
    }
    if (reply.status === 'timeout') {
      // The server did not answer in time: start over with a fresh socket.
      this.socket._teardown('join timeout');
      this.socket._scheduleReconnect();
      return;
    }
    this._setState('errored', String(reason));
    if (/JWT|token/i.test(String(reason))) {
      try {
        await this.onTokenRejected();
      } catch (error) {
        console.error('token refresh failed', error);
      }
    }
    this._scheduleRejoin();
  }

  leave() {
    this.left = true;
    clearTimeout(this.rejoinTimer);
    if (this.socket.isOpen() && this.state !== 'closed') {
      this.socket.push(this.topic, 'phx_leave', {}, { joinRef: this.joinRef, awaitReply: false });
    }
    this._setState('closed');
  }

  track(meta) {
    if (this.presence) this.presence.meta = meta;
    if (this.state === 'closed' || this.state === 'joining') return Promise.resolve(null);
    const payload = { ...meta, client_ref: this.clientRef };
    return this.socket.push(this.topic, 'presence',
      { type: 'presence', event: 'track', payload }, { joinRef: this.joinRef });
  }

  /** The key the server lists this page's presence under (from its payloads), or null. */
  get presenceKey() {
    if (!this.presence) return null;
    return this.presenceState.findKey((meta) => meta.client_ref === this.clientRef);
  }

  socketDown() {
    clearTimeout(this.rejoinTimer);
    if (this.state !== 'closed') this._setState('closed');
    this.joinRef = null;
  }

  receive({ event, payload }) {
    switch (event) {
      case 'postgres_changes':
        this._change(payload);
        break;
      case 'system':
        this._system(payload || {});
        break;
      case 'presence_state':
        this.presenceState.syncState(payload);
        this._presence();
        break;
      case 'presence_diff':
        this.presenceState.syncDiff(payload || {});
        this._presence();
        break;
      case 'phx_close':
      case 'phx_error':
        if (this.left) return;
        this.socket.log({ kind: 'error', topic: this.topic, message: `channel ${event}: rejoining` });
        this._setState('closed');
        this._scheduleRejoin();
        break;
      default:
        break;
    }
  }

  _change(payload) {
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
      this.socket.log({ kind: 'error', topic: this.topic, message: `handler failed: ${error}` });
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

  _system(payload) {
    this.socket.log({ kind: 'system', topic: this.topic, message: `${payload.extension}: ${payload.status}: ${payload.message}` });
    if (payload.status === 'error' && String(payload.message).startsWith('ResyncRequired')) {
      // phx_close follows: rejoin afresh, not from a cursor whose history is gone.
      this._forgetCursor();
      return;
    }
    if (payload.extension === 'postgres_changes' && payload.status === 'ok') {
      this._setState('subscribed');
      return;
    }
    if (payload.status === 'error' && /token has expired/i.test(String(payload.message))) {
      // phx_close follows; refresh first so the rejoin carries a valid token.
      this.onTokenRejected().catch((error) => console.error('token refresh failed', error));
    }
  }

  /** The server no longer has this cursor's history: the next join starts afresh. */
  _forgetCursor() {
    this.cursor = null;
    this.seen.clear();
    try {
      this.onResync();
    } catch (error) {
      console.error('onResync failed', error);
    }
  }

  _presence() {
    try {
      this.onPresence(this.presenceState);
    } catch (error) {
      console.error('presence handler failed', error);
    }
  }

  _scheduleRejoin() {
    if (this.left) return;
    clearTimeout(this.rejoinTimer);
    const delay = backoffDelay(this.rejoinAttempt, 1000, 30000);
    this.rejoinAttempt += 1;
    this.rejoinTimer = setTimeout(() => this.join(), delay);
  }

  _setState(state, detail) {
    this.state = state;
    try {
      this.onStatus(state, detail);
    } catch (error) {
      console.error('onStatus failed', error);
    }
    this.socket.channelStateChanged();
  }
}
