// The mechanic's active session (an accepted request, waiting or live): the panel
// (#active-session), the banner, its chat, and the Start / End buttons. Read from
// /api/sessions, kept current by the queue channel's session events. A read during
// which a session event came may be older than the event, so it is read again; of
// overlapping reads (and the answer of an action) only the latest is shown.

import { request } from './api.js';
import { h, $, show, setStatus, describeRequest } from './dom.js';
import { queueMessage } from './mechanic-queue-view.js';

const OPEN_SESSION = new Set(['waiting', 'live']);

/**
 * @param {object} options
 * @param {object} options.auth
 * @param {object} options.chat        from chat.js createChat
 * @param {(text: string) => void} options.announce
 */
export function createActiveSession({ auth, chat, announce }) {
  let active = null; // {session, assignment}
  let sessionEvents = 0; // session events seen (a read that saw this change may be older)
  let sessionReads = 0; // the latest read of the active session shows; older ones do not

  async function readActiveSession() {
    const sessions = await request('/api/sessions', { auth });
    const open = (sessions.items || []).find((s) => OPEN_SESSION.has(s.status));
    return open ? request(`/api/sessions/${open.id}`, { auth }) : null;
  }

  async function load() {
    const read = ++sessionReads;
    for (let tries = 0; tries < 3; tries += 1) {
      const seen = sessionEvents;
      const pair = await readActiveSession();
      if (read !== sessionReads) return; // a newer read (or an action's answer) shows
      if (seen === sessionEvents) {
        if (pair || active) setActive(pair);
        return;
      }
      // A session event came during the read: the read may be older. Read again (after
      // three tries, the events keep the panel current on their own).
    }
  }

  /** Show the answer of an action (accept, start, end): newer than any read in flight. */
  async function afterAction(answer) {
    const seen = sessionEvents;
    const pair = await answer;
    sessionReads += 1;
    setActive(pair);
    if (seen !== sessionEvents) load().catch(() => {});
    return pair;
  }

  function setActive(pair) {
    active = pair && OPEN_SESSION.has(pair.session.status) ? pair : null;
    render();
  }

  function render() {
    const section = $('#active-session');
    const banner = $('#banner');
    if (!active) {
      show(section, false);
      show(banner, false);
      banner.replaceChildren();
      chat.close();
      return;
    }
    const { session, assignment } = active;
    const who = describeRequest(assignment.request_summary);
    $('#active-summary').textContent = who;
    $('#active-concern').textContent = (assignment.request_summary || {}).concern || '';
    const live = session.status === 'live';
    $('#active-status').textContent = live ? 'Live now.' : 'Accepted: start the session when you are ready.';
    show($('#active-start'), !live);
    show(section);
    banner.replaceChildren(h('p', {}, h('strong', {}, live ? 'Live session' : 'Accepted session'), ` with ${who}`),
      h('a', { href: '#active-session' }, 'Go to the session'));
    banner.dataset.sessionId = session.id;
    show(banner);
    chat.open(session.id);
  }

  /** A sessions row event from the queue channel. */
  function onEvent(data) {
    sessionEvents += 1;
    const record = data.type === 'DELETE' ? data.old_record : data.record;
    if (!record || !record.id) return;
    const isActive = active && active.session.id === record.id;
    if (data.type === 'DELETE' || !OPEN_SESSION.has(record.status)) {
      if (isActive) {
        const who = describeRequest(active.assignment.request_summary);
        setActive(null);
        announce(`The session with ${who} ended.`);
        setStatus($('#active-message'), '');
        queueMessage(`The session with ${who} ended (${record.status || 'closed'}).`, 'ok');
      }
      return;
    }
    // waiting or live: only the accepted mechanic sees a session in these states.
    if (isActive) {
      active = { ...active, session: { ...active.session, ...record } };
      render();
    } else {
      load().catch(() => {});
    }
  }

  async function sessionAction(action, button) {
    if (!active) return;
    button.disabled = true;
    try {
      const id = active.session.id;
      const pair = await afterAction(request(`/api/sessions/${id}/${action}`, { method: 'POST', auth }));
      if (!OPEN_SESSION.has(pair.session.status)) queueMessage(`The session ended (${pair.session.status}).`, 'ok');
    } catch (error) {
      setStatus($('#active-message'), `Could not ${action} the session: ${error.message}`, 'error');
    } finally {
      button.disabled = false;
    }
  }

  $('#active-start').addEventListener('click', (e) => sessionAction('start', e.currentTarget));
  $('#active-end').addEventListener('click', (e) => sessionAction('end', e.currentTarget));

  return { load, afterAction, onEvent };
}
