// Presence on a channel: who is listed (Phoenix presence state plus diffs), what this
// page tracks, and the key the server lists this page under. The server decides that
// key (it may ignore the one a page asks for), so what a page tracks carries a random
// `client_ref`, and the page learns its key by finding that tag in presence_state /
// presence_diff. realtime-channel.js joins and pushes; this module keeps the state.

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

/** One channel's presence: its part of the join config, its track payloads, what it sees. */
export class ChannelPresence {
  /**
   * @param {object} options  the channel's options (see realtime-channel.js)
   * @param {{key?: string, meta: object}|null} [options.presence]  track this presence
   * @param {boolean} [options.watchPresence]  receive presence_state / presence_diff
   * @param {(presence: PresenceState) => void} [options.onPresence]
   */
  constructor(options = {}) {
    this.tracked = options.presence || null;
    this.watched = Boolean(options.watchPresence || options.presence);
    this.onPresence = options.onPresence || (() => {});
    this.state = new PresenceState();
    this.clientRef = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
  }

  /** The `presence` part of a phx_join's config (`key` is only a wish). */
  joinConfig() {
    return { enabled: this.watched, key: (this.tracked && this.tracked.key) || '' };
  }

  /** Keep `meta` as what this page tracks, for the next join to track again. */
  remember(meta) {
    if (this.tracked) this.tracked.meta = meta;
  }

  /** The payload of a track push: the meta, tagged so this page can find itself. */
  trackPayload(meta) {
    return { ...meta, client_ref: this.clientRef };
  }

  /** The key the server lists this page's presence under (from its payloads), or null. */
  get key() {
    if (!this.tracked) return null;
    return this.state.findKey((meta) => meta.client_ref === this.clientRef);
  }

  syncState(payload) {
    this.state.syncState(payload);
    this._changed();
  }

  syncDiff(payload) {
    this.state.syncDiff(payload || {});
    this._changed();
  }

  _changed() {
    try {
      this.onPresence(this.state);
    } catch (error) {
      console.error('presence handler failed', error);
    }
  }
}
