// The mechanic page's view of its realtime connection: when to poll instead, the
// #poll-notice, and the presence mark on the connection badge (#connection).
//
// When realtime has been down for 10 s, the page polls the queue every 5 s and says so.
// Polling stops the moment the socket is open again (the resumed channel brings what
// was missed; a poll still loading is dropped), unless the channel has not subscribed
// 10 s later. The presence mark says whether dispatch sees this page online, under the
// key the server chose (realtime-presence.js).

import { $, show } from './dom.js';
import { renderConnection, pageOption } from './shell.js';

const POLL_AFTER_MS = pageOption('poll_after_ms', 10000);
const POLL_EVERY_MS = pageOption('poll_every_ms', 5000);

/**
 * @param {object} options
 * @param {(stillWanted: () => boolean) => void} options.poll  read the queue once
 */
export function createConnectionWatch({ poll }) {
  let socket = null;
  let queueChannel = null;
  let presenceChannel = null;
  let polling = false;
  let pollEpoch = 0; // a poll started in an earlier polling spell is dropped
  let lastPoll = 0;

  /** The socket and channels to watch; until then update() and renderPresence() wait. */
  function attach(watched) {
    ({ socket, queueChannel, presenceChannel } = watched);
  }

  /** Should the page poll? Not while the queue channel is subscribed, nor while a socket
   * that just opened is joining (the resumed channel is about to bring what was missed). */
  function realtimeDown(now) {
    if (queueChannel.state === 'subscribed') return false;
    if (socket.openedAt !== null && now - socket.openedAt < POLL_AFTER_MS) return false;
    return socket.downSince !== null && now - socket.downSince >= POLL_AFTER_MS;
  }

  function startPoll() {
    lastPoll = Date.now();
    const epoch = pollEpoch;
    poll(() => polling && epoch === pollEpoch);
  }

  /** On every socket state change and every second. */
  function update() {
    if (!queueChannel) return; // not set up yet
    const now = Date.now();
    const state = { phase: socket.phase, downSince: socket.downSince };
    const down = realtimeDown(now);
    if (down && !polling) {
      polling = true;
      lastPoll = 0;
    } else if (!down && polling) {
      polling = false;
      pollEpoch += 1;
    }
    const notice = $('#poll-notice');
    if (polling) {
      const text = `Realtime is down: checking for new requests every ${POLL_EVERY_MS / 1000} s.`;
      if (notice.textContent !== text) notice.textContent = text;
      show(notice);
      renderConnection(state, 'polling');
      if (now - lastPoll >= POLL_EVERY_MS) startPoll();
    } else {
      show(notice, false);
    }
    renderPresence();
  }

  /** Whether dispatch sees this page online, under the key the server chose. */
  function renderPresence() {
    if (!presenceChannel) return; // not set up yet
    const element = $('#connection');
    const key = presenceChannel.state === 'subscribed' ? presenceChannel.presenceKey : null;
    if (key === null) delete element.dataset.presenceKey;
    else element.dataset.presenceKey = key;
    element.dataset.presence = key === null ? 'unlisted' : 'listed';
    element.title = key === null ? 'Not shown online to dispatch yet' : 'Dispatch sees you online';
  }

  return { attach, update, renderPresence };
}
