// One channel on the realtime socket: its join (postgres_changes bindings, presence
// config, access token, resume cursor), its state ("subscribed" only once the server
// says "Subscribed to PostgreSQL"), rejoining with backoff after a refusal or a
// phx_close, the token refresh a refusal asks for, and the dispatch of its frames to
// the row events (realtime-changes.js) and presence (realtime-presence.js).

import { backoffDelay } from './backoff.js';
import { ChangeFeed } from './realtime-changes.js';
import { ChannelPresence } from './realtime-presence.js';

export class Channel {
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
    this.feed = new ChangeFeed(options, (message) => this.socket.log({ kind: 'error', topic: this.topic, message }));
    this.presence = new ChannelPresence(options);
    this.onStatus = options.onStatus || (() => {});
    this.onTokenRejected = options.onTokenRejected || (async () => {});
    this.state = 'closed';
    this.joinRef = null;
    this.rejoinTimer = null;
    this.rejoinAttempt = 0;
    this.left = false;
  }

  /** The last event id handled (what a rejoin resumes after), or null. */
  get cursor() {
    return this.feed.cursor;
  }

  /** The key the server lists this page's presence under (from its payloads), or null. */
  get presenceKey() {
    return this.presence.key;
  }

  async join() {
    if (this.left || !this.socket.isOpen()) return;
    clearTimeout(this.rejoinTimer);
    this._setState('joining');
    const payload = {
      config: {
        broadcast: { ack: false, self: false },
        presence: this.presence.joinConfig(),
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
      if (this.presence.tracked) this.track(this.presence.tracked.meta);
      return;
    }
    const reason = (reply.response && reply.response.reason) || reply.status;
    this.socket.log({ kind: 'error', topic: this.topic, message: `join refused: ${reason}` });
    if (String(reason).startsWith('ResyncRequired')) {
      this.feed.forgetCursor();
      this.join();
      return;
    }
    if (reply.status === 'timeout') {
      // The server did not answer in time: start over with a fresh socket.
      this.socket.restart('join timeout');
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
    this.presence.remember(meta);
    if (this.state === 'closed' || this.state === 'joining') return Promise.resolve(null);
    return this.socket.push(this.topic, 'presence',
      { type: 'presence', event: 'track', payload: this.presence.trackPayload(meta) }, { joinRef: this.joinRef });
  }

  /** A fresh token for a joined channel (the socket sends it to each after a refresh). */
  sendAccessToken(token) {
    if (this.state === 'joined' || this.state === 'subscribed') {
      this.socket.push(this.topic, 'access_token', { access_token: token },
        { joinRef: this.joinRef, awaitReply: false });
    }
  }

  socketDown() {
    clearTimeout(this.rejoinTimer);
    if (this.state !== 'closed') this._setState('closed');
    this.joinRef = null;
  }

  receive({ event, payload }) {
    switch (event) {
      case 'postgres_changes':
        this.feed.receive(payload);
        break;
      case 'system':
        this._system(payload || {});
        break;
      case 'presence_state':
        this.presence.syncState(payload);
        break;
      case 'presence_diff':
        this.presence.syncDiff(payload);
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

  _system(payload) {
    this.socket.log({ kind: 'system', topic: this.topic, message: `${payload.extension}: ${payload.status}: ${payload.message}` });
    if (payload.status === 'error' && String(payload.message).startsWith('ResyncRequired')) {
      // phx_close follows: rejoin afresh, not from a cursor whose history is gone.
      this.feed.forgetCursor();
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
