// The mechanic page's alert settings (feature flags, set by an admin): read from
// /api/feature-flags, kept current by the queue channel's flag events, listed in
// #flag-list. Until they are loaded `current` is null and alerts wait (none is dropped,
// no flag is bypassed); a failed read is retried every 3 s.

import { request } from './api.js';
import { h, $ } from './dom.js';
import { MASTER_FLAG, TIER_FLAGS } from './alerts.js';

const FLAG_LABELS = {
  [MASTER_FLAG]: 'New-request alerts',
  [TIER_FLAGS.sound]: 'Sound',
  [TIER_FLAGS.notification]: 'System notifications',
  [TIER_FLAGS.title]: 'Tab title and icon badge',
};

/**
 * @param {object} options
 * @param {object} options.auth
 * @param {() => void} options.onLoaded              after each read that succeeded
 * @param {(error: Error) => void} options.onLoadFailed  before the retry is scheduled
 */
export function createFlags({ auth, onLoaded, onLoadFailed }) {
  let flags = null; // {key: enabled}, null until loaded
  let retry = null;
  let loads = 0;
  let eventsDuringLoad = [];

  async function load() {
    clearTimeout(retry);
    loads += 1;
    try {
      const body = await request('/api/feature-flags', { auth });
      flags = Object.fromEntries(body.items.map((f) => [f.key, f.enabled]));
      // Changes that arrived while this was loading go on top (the read may be older).
      for (const data of eventsDuringLoad) apply(data);
      render();
      onLoaded();
    } catch (error) {
      // Alerts wait for the flags (none is dropped, no flag is bypassed); the cards show.
      onLoadFailed(error);
      retry = setTimeout(load, 3000);
    } finally {
      loads -= 1;
      if (loads === 0) eventsDuringLoad = [];
    }
  }

  function render() {
    const list = $('#flag-list');
    list.replaceChildren(...Object.entries(FLAG_LABELS).map(([key, label]) => {
      const on = flags !== null && flags[key] === true;
      const state = flags === null ? 'loading…' : (on ? 'on' : 'off');
      return h('li', { dataset: { flag: key, enabled: flags === null ? 'unknown' : String(on) } },
        h('span', {}, label), ' ', h('strong', {}, state));
    }));
  }

  function apply(data) {
    const record = data.type === 'DELETE' ? data.old_record : data.record;
    if (!record || !record.key || !flags) return;
    if (data.type === 'DELETE') delete flags[record.key];
    else flags[record.key] = record.enabled === true;
  }

  /** A feature_flags row event from the queue channel. */
  function onEvent(data) {
    if (loads > 0) eventsDuringLoad.push(data);
    apply(data);
    render();
  }

  return {
    /** {key: enabled}, or null until the first read. */
    get current() {
      return flags;
    },
    load,
    render,
    onEvent,
  };
}
