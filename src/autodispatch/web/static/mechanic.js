// The mechanic dashboard: the live queue, the alerts, accept/decline, the active session.
//
// How the queue stays right:
// - Realtime first, then the snapshot. After every (re)subscribe the page fetches GET
//   /api/mechanic/queue and re-applies the events that arrived while it was loading, so
//   nothing committed around the fetch is lost; rows keep the id of their last event,
//   so an older event never overwrites a newer state. When catch-ups overlap (a rejoin
//   while one loads), only the latest one's snapshot applies (CatchUp).
// - The channel resumes from the last event id (kept in localStorage), so a page that
//   was closed or lost its connection is sent what it missed.
// - When realtime has been down for 10 s, the page polls the queue every 5 s and says so.
//   Polling stops the moment the socket is open again (the resumed channel brings what
//   was missed; a poll still loading is dropped), unless the channel has not subscribed
//   10 s later.
// - A request is alerted once per browser: its key is claimed in localStorage before
//   the alert runs, whichever path (live event, replay, snapshot, poll) saw it first.
//   The first time a mechanic opens the page in a browser, requests already waiting are
//   listed without alerting (they are not new); on every later visit, requests that came
//   in while the page was closed alert once. An alert raised by a read (a poll, a
//   snapshot) has no event in hand: its receipt names the request, and the server finds
//   the event.
// - The active session is read again when a session event came during a read (the read
//   may be older than the event); of overlapping reads, only the latest is shown.

import { request, ApiError } from './api.js';
import { h, $, show, setStatus, announcer, formatAge, ageSince, describeRequest } from './dom.js';
import { setupSession, openSocket, renderConnection, pageOption } from './shell.js';
import { QueueStore, AlertMemory, alertKey, CatchUp } from './queue-state.js';
import { createAlerter, Badges, unlockAudio, askNotificationPermission, MASTER_FLAG, TIER_FLAGS } from './alerts.js';
import { ReceiptOutbox } from './receipts.js';
import { createChat } from './chat.js';
import { registerServiceWorker, subscribeToPush, unsubscribeFromPush } from './push.js';

const BASE_TITLE = 'Mechanic dashboard · autodispatch';
const POLL_AFTER_MS = pageOption('poll_after_ms', 10000);
const POLL_EVERY_MS = pageOption('poll_every_ms', 5000);
const OPEN_SESSION = new Set(['waiting', 'live']);
const FLAG_LABELS = {
  [MASTER_FLAG]: 'New-request alerts',
  [TIER_FLAGS.sound]: 'Sound',
  [TIER_FLAGS.notification]: 'System notifications',
  [TIER_FLAGS.title]: 'Tab title and icon badge',
};

setupSession({
  namespace: 'mechanic',
  roles: ['mechanic'],
  pageName: BASE_TITLE,
  // This browser should not get pushes for someone who signed out of it.
  beforeSignOut: (auth) => unsubscribeFromPush(auth),
  onSignedIn: (auth) => start(auth).catch((error) => {
    console.error(error);
    setStatus($('#queue-message'), `The dashboard failed to start: ${error.message}`, 'error');
  }),
});

// Audio may only start after a gesture: any click or key press unlocks it, and tells the
// page the mechanic has seen it (clearing the title and icon badge).
for (const type of ['click', 'keydown']) document.addEventListener(type, unlockAudio, { capture: true });

async function start(auth) {
  const userId = auth.user.id;
  const announce = announcer($('#announcer'));
  const store = new QueueStore();
  const memory = new AlertMemory(userId);
  const badges = new Badges(BASE_TITLE);
  const outbox = new ReceiptOutbox(userId, auth);
  const chat = createChat($('#active-chat'), auth);
  const enterEvents = new Map(); // assignment id -> the event that put it in the queue
  let flags = null; // {key: enabled}, null until loaded
  let pendingAlerts = []; // waiting for the flags
  const catchUps = new CatchUp(); // the queue's snapshot reads
  let firstCatchUp = memory.isNew;
  let active = null; // {session, assignment}
  let sessionEvents = 0; // session events seen (a read that saw this change may be older)
  let sessionReads = 0; // the latest read of the active session shows; older ones do not
  let polling = false;
  let pollEpoch = 0; // a poll started in an earlier polling spell is dropped
  let lastPoll = 0;
  let socket = null;
  let queueChannel = null;
  let presenceChannel = null;

  show($('#dashboard'));
  document.title = BASE_TITLE;
  for (const type of ['click', 'keydown']) document.addEventListener(type, () => badges.clear());
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible' && document.hasFocus()) badges.clear();
  });
  window.addEventListener('pagehide', () => memory.flush());

  const alerter = createAlerter({
    toastRegion: $('#toasts'),
    badges,
    onView: (assignment) => focusCard(assignment.id),
    onReceipt: (receipt) => outbox.send(receipt),
  });

  // -- flags --------------------------------------------------------------------------

  let flagRetry = null;
  let flagLoads = 0;
  let flagEventsDuringLoad = [];
  async function loadFlags() {
    clearTimeout(flagRetry);
    flagLoads += 1;
    try {
      const body = await request('/api/feature-flags', { auth });
      flags = Object.fromEntries(body.items.map((f) => [f.key, f.enabled]));
      // Changes that arrived while this was loading go on top (the read may be older).
      for (const data of flagEventsDuringLoad) applyFlagEvent(data);
      renderFlags();
      flushPendingAlerts();
      if ($('#notification-status').textContent.startsWith('Could not load the alert settings')) {
        setStatus($('#notification-status'), describePermission());
      }
    } catch (error) {
      // Alerts wait for the flags (none is dropped, no flag is bypassed); the cards show.
      setStatus($('#notification-status'), `Could not load the alert settings (${error.message}); retrying.`, 'error');
      flagRetry = setTimeout(loadFlags, 3000);
    } finally {
      flagLoads -= 1;
      if (flagLoads === 0) flagEventsDuringLoad = [];
    }
  }

  function renderFlags() {
    const list = $('#flag-list');
    list.replaceChildren(...Object.entries(FLAG_LABELS).map(([key, label]) => {
      const on = flags !== null && flags[key] === true;
      const state = flags === null ? 'loading…' : (on ? 'on' : 'off');
      return h('li', { dataset: { flag: key, enabled: flags === null ? 'unknown' : String(on) } },
        h('span', {}, label), ' ', h('strong', {}, state));
    }));
  }

  function applyFlagEvent(data) {
    const record = data.type === 'DELETE' ? data.old_record : data.record;
    if (!record || !record.key || !flags) return;
    if (data.type === 'DELETE') delete flags[record.key];
    else flags[record.key] = record.enabled === true;
  }

  function onFlagEvent(data) {
    if (flagLoads > 0) flagEventsDuringLoad.push(data);
    applyFlagEvent(data);
    renderFlags();
  }

  // -- alerts -------------------------------------------------------------------------

  function maybeAlert(assignment, event) {
    const key = alertKey(assignment);
    // An offer alert also covers the request itself (no second alert after a decline).
    const keys = assignment.status === 'offered' ? [key, `request:${assignment.id}`] : [key];
    if (!memory.claim(keys)) return;
    markNew(assignment.id);
    const summary = assignment.request_summary || {};
    announce(`${assignment.status === 'offered' ? 'Request offered to you' : 'New request'}: ${describeRequest(summary)}. ${summary.concern || ''}`);
    if (flags === null) {
      pendingAlerts.push([assignment, event]);
      return;
    }
    alerter.alert(assignment, flags, event);
  }

  function flushPendingAlerts() {
    const waiting = pendingAlerts;
    pendingAlerts = [];
    for (const [assignment, event] of waiting) {
      // Only what is still takeable: a request gone meanwhile is not worth an alert.
      if (store.items.has(assignment.id)) alerter.alert(store.items.get(assignment.id), flags, event);
    }
  }

  /** After a snapshot: alert whatever is in the queue and not alerted yet. */
  function alertUnseen() {
    for (const assignment of store.list()) {
      // On a first visit, what was already waiting is listed, not alerted; what an event
      // brought while the page was loading is new and alerts.
      if (firstCatchUp && !enterEvents.has(assignment.id)) {
        memory.claim([alertKey(assignment), `request:${assignment.id}`]);
      } else {
        maybeAlert(assignment, enterEvents.get(assignment.id) || null);
      }
    }
    if (firstCatchUp && store.items.size) {
      announce(`${store.items.size} request${store.items.size === 1 ? '' : 's'} waiting.`);
    }
    firstCatchUp = false;
  }

  // -- the queue ----------------------------------------------------------------------

  function onAssignmentEvent(data) {
    const catchingUp = catchUps.note(data);
    applyAssignmentEvent(data, !catchingUp);
  }

  function applyAssignmentEvent(data, live) {
    const { kind, assignment } = store.applyEvent(data);
    if (kind === 'removed') enterEvents.delete(assignment.id);
    if (kind === 'added' || kind === 'updated') {
      const before = enterEvents.get(assignment.id);
      if (kind === 'added' || !before || assignment.status === 'offered') {
        enterEvents.set(assignment.id, { event_id: data.event_id, commit_timestamp: data.commit_timestamp });
      }
    }
    // The card first, then the alert (which highlights it and whose View focuses it).
    // An assignment we accepted leaves the queue; the session events bring the panel.
    renderQueue();
    if (live && (kind === 'added' || kind === 'updated')) maybeAlert(assignment, data);
  }

  async function catchUp() {
    const load = catchUps.begin();
    let queue;
    try {
      [queue] = await Promise.all([
        request('/api/mechanic/queue', { auth }),
        loadActiveSession(),
        loadFlags(),
      ]);
    } catch (error) {
      const events = catchUps.finish(load);
      if (events === null) return; // a newer catch-up is loading: it reports for itself
      // The events that came meanwhile are on the page already; alert them now.
      for (const data of events) {
        const id = data.record && data.record.id;
        if (store.items.has(id)) maybeAlert(store.items.get(id), data);
      }
      setStatus($('#queue-message'), `Could not load the queue: ${error.message}. Retrying…`, 'error');
      setTimeout(() => {
        if (catchUps.isCurrent(load) && queueChannel.state === 'subscribed') catchUp();
      }, 3000);
      return;
    }
    // A newer catch-up started while this one loaded: this snapshot may be older than
    // events already applied, and the newer one keeps them. Drop it.
    const events = catchUps.finish(load);
    if (events === null) return;
    store.applySnapshot(queue.items || []);
    for (const data of events) applyAssignmentEvent(data, false);
    renderQueue();
    alertUnseen();
    setStatus($('#queue-message'), '');
    outbox.retry();
  }

  async function poll() {
    lastPoll = Date.now();
    const epoch = pollEpoch;
    try {
      const [queue] = await Promise.all([
        request('/api/mechanic/queue', { auth, timeoutMs: 8000 }),
        loadFlags(), // flag changes made while realtime is down apply too
      ]);
      // Realtime came back meanwhile: its catch-up and live events own the queue.
      if (!polling || epoch !== pollEpoch || catchUps.active) return;
      store.applySnapshot(queue.items || []);
      renderQueue();
      alertUnseen();
      setStatus($('#queue-message'), '');
    } catch (error) {
      setStatus($('#queue-message'), `Could not check for requests: ${error.message}`, 'error');
    }
  }

  /** Should the page poll? Not while the queue channel is subscribed, nor while a socket
   * that just opened is joining (the resumed channel is about to bring what was missed). */
  function realtimeDown(now) {
    if (queueChannel.state === 'subscribed') return false;
    if (socket.openedAt !== null && now - socket.openedAt < POLL_AFTER_MS) return false;
    return socket.downSince !== null && now - socket.downSince >= POLL_AFTER_MS;
  }

  function watchConnection() {
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
      if (now - lastPoll >= POLL_EVERY_MS) poll();
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

  const cards = new Map(); // assignment id -> li

  function renderQueue() {
    const list = $('#queue-list');
    const items = store.list();
    const ids = new Set(items.map((a) => a.id));
    for (const [id, card] of cards) {
      if (!ids.has(id)) {
        card.remove();
        cards.delete(id);
      }
    }
    // An alert about a request that is gone (taken, cancelled) is no longer true.
    for (const toast of document.querySelectorAll('#toasts .toast')) {
      const id = toast.dataset.assignmentId;
      if (id && id !== 'sample' && !ids.has(id)) toast.remove();
    }
    items.forEach((assignment, index) => {
      let card = cards.get(assignment.id);
      if (!card || card.dataset.status !== assignment.status) {
        const fresh = renderCard(assignment);
        if (card) card.replaceWith(fresh);
        card = fresh;
        cards.set(assignment.id, card);
      }
      if (list.children[index] !== card) list.insertBefore(card, list.children[index] || null);
    });
    $('#queue-count').textContent = String(items.length);
    show($('#queue-empty'), items.length === 0);
    tickAges();
  }

  function renderCard(assignment) {
    const summary = assignment.request_summary || {};
    const offered = assignment.status === 'offered';
    const titleId = `request-${assignment.id}`;
    const accept = h('button', { type: 'button', class: 'accept', 'aria-describedby': titleId }, 'Accept');
    accept.addEventListener('click', () => acceptRequest(assignment, accept));
    const actions = [accept];
    if (offered) {
      const decline = h('button', { type: 'button', class: 'secondary decline', 'aria-describedby': titleId }, 'Decline');
      decline.addEventListener('click', () => declineOffer(assignment, decline));
      actions.push(decline);
    }
    return h('li', { class: offered ? 'request-card offered' : 'request-card', dataset: { assignmentId: assignment.id, status: assignment.status } },
      h('h3', { id: titleId }, describeRequest(summary) || 'A request'),
      summary.concern ? h('p', { class: 'concern' }, summary.concern) : null,
      h('p', { class: 'meta' },
        h('span', { class: 'badge' }, summary.session_type === 'paid' ? 'Paid' : 'Free'), ' ',
        offered ? h('span', { class: 'badge offer' }, 'Offered to you') : null, ' ',
        h('span', { class: 'age', dataset: { since: assignment.queued_at || assignment.created_at } }, ''),
        offered && assignment.offer_expires_at
          ? h('span', { class: 'expires', dataset: { until: assignment.offer_expires_at } }, '') : null),
      h('div', { class: 'actions' }, actions));
  }

  function tickAges() {
    const now = Date.now();
    for (const element of document.querySelectorAll('#queue-list .age')) {
      element.textContent = `waiting ${formatAge(ageSince(element.dataset.since, now))}`;
    }
    for (const element of document.querySelectorAll('#queue-list .expires')) {
      const left = -ageSince(element.dataset.until, now);
      element.textContent = left > 0 ? ` · offer ends in ${formatAge(left)}` : ' · offer ending';
    }
  }

  function markNew(id) {
    const card = cards.get(id);
    if (card) {
      card.classList.add('new');
      setTimeout(() => card.classList.remove('new'), 4000);
    }
  }

  function focusCard(id) {
    const card = cards.get(id);
    if (card) {
      card.scrollIntoView({ block: 'center' });
      card.querySelector('button.accept').focus();
    }
  }

  function queueMessage(text, kind) {
    setStatus($('#queue-message'), text, kind);
  }

  async function acceptRequest(assignment, button) {
    button.disabled = true;
    queueMessage('Accepting…');
    try {
      await afterAction(request(`/api/assignments/${assignment.id}/accept`, { method: 'POST', auth }));
      store.remove(assignment.id);
      renderQueue();
      queueMessage(`You accepted ${describeRequest(assignment.request_summary)}.`, 'ok');
      $('#active-title').focus();
    } catch (error) {
      button.disabled = false;
      if (error instanceof ApiError && error.code === 'already_taken') {
        store.remove(assignment.id);
        renderQueue();
        queueMessage('Another mechanic took this request.', 'error');
      } else if (error instanceof ApiError && error.status === 409) {
        store.remove(assignment.id);
        renderQueue();
        queueMessage(`This request can no longer be accepted: ${error.message}`, 'error');
      } else if (error instanceof ApiError && error.status === 0) {
        queueMessage('Could not reach the server: the request was not accepted. Try again.', 'error');
      } else {
        queueMessage(`Not accepted: ${error.message}`, 'error');
      }
    }
  }

  async function declineOffer(assignment, button) {
    button.disabled = true;
    try {
      await request(`/api/assignments/${assignment.id}/decline`, { method: 'POST', auth });
      queueMessage('Offer declined: the request went back to the open queue.', 'ok');
    } catch (error) {
      button.disabled = false;
      queueMessage(`Not declined: ${error.message}`, 'error');
    }
  }

  // -- the active session ---------------------------------------------------------------

  async function readActiveSession() {
    const sessions = await request('/api/sessions', { auth });
    const open = (sessions.items || []).find((s) => OPEN_SESSION.has(s.status));
    return open ? request(`/api/sessions/${open.id}`, { auth }) : null;
  }

  async function loadActiveSession() {
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
    if (seen !== sessionEvents) loadActiveSession().catch(() => {});
    return pair;
  }

  function setActive(pair) {
    active = pair && OPEN_SESSION.has(pair.session.status) ? pair : null;
    renderActive();
  }

  function renderActive() {
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

  function onSessionEvent(data) {
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
      renderActive();
    } else {
      loadActiveSession().catch(() => {});
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

  // -- notifications and push -----------------------------------------------------------

  const notificationButton = $('#enable-notifications');
  const notificationStatus = $('#notification-status');
  function describePermission() {
    if (!('Notification' in window)) return 'This browser cannot show notifications.';
    return {
      granted: 'System notifications are on in this browser.',
      denied: 'Notifications are blocked for this site: allow them in the browser\'s site settings.',
      default: 'System notifications are off until you enable them.',
    }[Notification.permission];
  }
  setStatus(notificationStatus, describePermission());
  registerServiceWorker().catch((error) => console.warn('service worker not registered', error));
  notificationButton.addEventListener('click', async () => {
    notificationButton.disabled = true;
    try {
      const permission = await askNotificationPermission();
      if (permission !== 'granted') {
        setStatus(notificationStatus, describePermission(), permission === 'denied' ? 'error' : 'info');
        return;
      }
      setStatus(notificationStatus, 'Notifications are on. Setting up alerts for when this page is closed…');
      const outcome = await subscribeToPush(auth);
      setStatus(notificationStatus, outcome.ok
        ? 'Notifications are on, also when this page is closed.'
        : `Notifications are on while this page is open. Closed-page alerts are unavailable: ${outcome.reason}`,
      outcome.ok ? 'ok' : 'info');
    } finally {
      notificationButton.disabled = false;
    }
  });

  $('#try-alert').addEventListener('click', async () => {
    const sample = {
      id: 'sample', status: 'queued',
      request_summary: { customer_first_name: 'Sample', vehicle: '2020 Demo Car', concern: 'This is how an alert looks and sounds.', session_type: 'free' },
    };
    const receipt = await alerter.alert(sample, flags || {}, null, { sendReceipt: false });
    const worked = Object.entries(receipt.tiers).map(([tier, r]) => `${tier}: ${r.status}${r.error ? ` (${r.error})` : ''}`);
    setStatus(notificationStatus, `Alert tried. ${worked.join('; ')}`);
  });

  // -- realtime -------------------------------------------------------------------------

  socket = await openSocket(auth, { onState: () => watchConnection() });
  queueChannel = socket.channel(`queue:${userId}`, {
    changes: [
      { event: '*', schema: 'public', table: 'session_assignments' },
      { event: '*', schema: 'public', table: 'sessions' },
      { event: '*', schema: 'public', table: 'feature_flags' },
      { event: 'INSERT', schema: 'public', table: 'session_messages' },
    ],
    cursor: memory.cursor,
    onChange: (data) => {
      if (data.table === 'session_assignments') onAssignmentEvent(data);
      else if (data.table === 'sessions') onSessionEvent(data);
      else if (data.table === 'feature_flags') onFlagEvent(data);
      else if (data.table === 'session_messages') chat.onEvent(data);
    },
    onCursor: (cursor) => { memory.cursor = cursor; },
    onResync: () => memory.forgetCursor(),
    onStatus: (status) => {
      if (status === 'subscribed') catchUp();
    },
    onTokenRejected: () => auth.refresh(),
  });
  // The key is a wish (grouping this mechanic's tabs) that the server may override: the
  // page reads the key it is listed under from the presence payloads (renderPresence).
  presenceChannel = socket.channel('mechanics-online', {
    presence: { key: userId, meta: { name: auth.name, user_id: userId, online_at: new Date().toISOString() } },
    onPresence: () => renderPresence(),
  });
  socket.connect();
  // Not waiting for realtime: if it never comes up, polling starts after 10 s, and the
  // flags and the active session must be known by then.
  loadFlags();
  loadActiveSession().catch(() => {});
  setInterval(() => {
    watchConnection();
    tickAges();
  }, 1000);
  renderFlags();
}
