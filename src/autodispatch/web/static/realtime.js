// A small client for our realtime server: the Supabase Realtime protocol (Phoenix
// channels, vsn 1.0.0 JSON frames) plus our resume extension. Pages import it from here.
//
// This module is the socket: one WebSocket for many channels, its phase (what the
// connection badge shows), heartbeats (a heartbeat left unanswered closes the socket),
// and reconnecting, which backs off exponentially with jitter and goes at once when the
// browser comes back online. `setAccessToken` sends a fresh token to every joined
// channel. The other jobs live apart:
// - realtime-wire.js: frames, refs and awaited replies, the heartbeat, the socket URL.
// - realtime-channel.js: a channel's join, state and rejoin (after any disconnect).
// - realtime-changes.js: row events, de-duplicated by event id, and the resume cursor.
// - realtime-presence.js: presence state and the key the server lists this page under.
// - backoff.js: the delay before a reconnect or a rejoin.

import { backoffDelay } from './backoff.js';
import { Channel } from './realtime-channel.js';
import { socketUrl, encodeFrame, decodeFrame, PendingReplies, Heartbeat } from './realtime-wire.js';

export { backoffDelay, socketUrl };
export { PresenceState } from './realtime-presence.js';

export const PHASE = Object.freeze({
  CONNECTING: 'connecting', // first connection attempt
  LIVE: 'live', // socket open and every channel subscribed
  JOINING: 'joining', // socket open, a channel not yet subscribed
  RECONNECTING: 'reconnecting', // waiting before the next attempt
  OFFLINE: 'offline', // the browser says it has no network
  CLOSED: 'closed', // disconnect() was called
});

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
    this.replies = new PendingReplies();
    this.heartbeat = new Heartbeat();
    this.attempt = 0;
    this.stopped = true;
    this.phase = PHASE.CLOSED;
    this.downSince = Date.now(); // not live since (null while live)
    this.openedAt = null; // when the current socket opened (null while there is none)
    this.retryTimer = null;
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

  /** Drop this socket and try a fresh one after the backoff wait. */
  restart(why) {
    this._teardown(why);
    this._scheduleReconnect();
  }

  setAccessToken(token) {
    for (const channel of this.channels.values()) channel.sendAccessToken(token);
  }

  makeRef() {
    this.ref += 1;
    return String(this.ref);
  }

  isOpen() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  /** Send a message; resolves with the reply payload (or null when no reply is awaited). */
  push(topic, event, payload, { joinRef = null, ref = null, awaitReply = true,
    timeoutMs = this.joinTimeoutMs } = {}) {
    if (!this.isOpen()) return Promise.resolve({ status: 'error', response: { reason: 'not connected' } });
    ref = ref ?? this.makeRef();
    this.ws.send(encodeFrame(topic, event, payload, ref, joinRef));
    if (!awaitReply) return Promise.resolve(null);
    return this.replies.wait(ref, timeoutMs);
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
        frame = decodeFrame(message.data);
      } catch {
        this.log({ kind: 'error', message: 'a frame that is not JSON was ignored' });
        return;
      }
      this._receive(frame);
    };
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this.log({ kind: 'socket', message: `closed (${event.code}${event.reason ? `: ${event.reason}` : ''})` });
      this.restart('socket closed');
    };
    ws.onerror = () => {
      // onclose follows; nothing else to do.
    };
  }

  _teardown(why) {
    this.heartbeat.stop();
    this.replies.failAll(why);
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
    this.heartbeat.start(this.heartbeatMs, {
      makeRef: () => this.makeRef(),
      send: (text) => this.ws.send(text),
      onMissed: () => {
        // The last heartbeat was never answered: the connection is dead.
        this.log({ kind: 'error', message: 'heartbeat unanswered: reconnecting' });
        this.restart('heartbeat timeout');
      },
      onSendFailed: () => this.restart('heartbeat send failed'),
    });
  }

  _receive(frame) {
    const { topic, event, payload, ref } = frame;
    if (topic === 'phoenix') {
      this.heartbeat.answered(ref);
      return;
    }
    if (event === 'phx_reply' && this.replies.settle(ref, payload)) return;
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
