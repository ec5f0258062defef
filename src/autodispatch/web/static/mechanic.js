// The mechanic dashboard: the live queue, the alerts, accept/decline, the active session.
// This module signs in and wires the parts together; each part owns one job:
// - mechanic-queue-sync.js: live events, the catch-up after every (re)subscribe, polls.
// - mechanic-queue-view.js: the request cards; mechanic-queue-actions.js: accept/decline.
// - mechanic-alerting.js: whether a request alerts (once per browser) and with which event.
// - mechanic-flags.js: the alert settings; mechanic-notifications.js: permission and push.
// - mechanic-session.js: the active session panel, its chat and Start/End.
// - mechanic-connection.js: polling while realtime is down, and the presence mark.
// The channel resumes from the last event id (kept in localStorage by AlertMemory), so
// a page that was closed or lost its connection is sent what it missed.

import { $, show, setStatus, announcer } from './dom.js';
import { setupSession, openSocket } from './shell.js';
import { QueueStore, AlertMemory } from './queue-state.js';
import { createAlerter, Badges, unlockAudio } from './alerts.js';
import { ReceiptOutbox } from './receipts.js';
import { createChat } from './chat.js';
import { unsubscribeFromPush } from './push.js';
import { createFlags } from './mechanic-flags.js';
import { createAlerting } from './mechanic-alerting.js';
import { createQueueView } from './mechanic-queue-view.js';
import { createQueueActions } from './mechanic-queue-actions.js';
import { createQueueSync } from './mechanic-queue-sync.js';
import { createActiveSession } from './mechanic-session.js';
import { createConnectionWatch } from './mechanic-connection.js';
import { createNotificationControls } from './mechanic-notifications.js';

const BASE_TITLE = 'Mechanic dashboard · autodispatch';

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

  show($('#dashboard'));
  document.title = BASE_TITLE;
  for (const type of ['click', 'keydown']) document.addEventListener(type, () => badges.clear());
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible' && document.hasFocus()) badges.clear();
  });
  window.addEventListener('pagehide', () => memory.flush());

  // The parts call one another through these closures: each is built before any is used.
  const view = createQueueView({
    store,
    onAccept: (assignment, button) => actions.accept(assignment, button),
    onDecline: (assignment, button) => actions.decline(assignment, button),
  });
  const alerter = createAlerter({
    toastRegion: $('#toasts'),
    badges,
    onView: (assignment) => view.focusCard(assignment.id),
    onReceipt: (receipt) => outbox.send(receipt),
  });
  const flags = createFlags({
    auth,
    onLoaded: () => {
      alerting.flushPending();
      notifications.flagsLoaded();
    },
    onLoadFailed: (error) => notifications.flagsFailed(error),
  });
  const alerting = createAlerting({ store, memory, alerter, flags, announce, view });
  const session = createActiveSession({ auth, chat, announce });
  const actions = createQueueActions({ auth, store, view, session });
  let queueChannel = null;
  const sync = createQueueSync({
    auth, store, view, alerting, session, flags, outbox,
    isSubscribed: () => queueChannel.state === 'subscribed',
  });
  const watch = createConnectionWatch({ poll: (stillWanted) => sync.poll(stillWanted) });
  const notifications = createNotificationControls({ auth, alerter, flags });

  // -- realtime -------------------------------------------------------------------------

  const socket = await openSocket(auth, { onState: () => watch.update() });
  queueChannel = socket.channel(`queue:${userId}`, {
    changes: [
      { event: '*', schema: 'public', table: 'session_assignments' },
      { event: '*', schema: 'public', table: 'sessions' },
      { event: '*', schema: 'public', table: 'feature_flags' },
      { event: 'INSERT', schema: 'public', table: 'session_messages' },
    ],
    cursor: memory.cursor,
    onChange: (data) => {
      if (data.table === 'session_assignments') sync.onEvent(data);
      else if (data.table === 'sessions') session.onEvent(data);
      else if (data.table === 'feature_flags') flags.onEvent(data);
      else if (data.table === 'session_messages') chat.onEvent(data);
    },
    onCursor: (cursor) => { memory.cursor = cursor; },
    onResync: () => memory.forgetCursor(),
    onStatus: (status) => {
      if (status === 'subscribed') sync.catchUp();
    },
    onTokenRejected: () => auth.refresh(),
  });
  // The key is a wish (grouping this mechanic's tabs) that the server may override: the
  // page reads the key it is listed under from the presence payloads (renderPresence).
  const presenceChannel = socket.channel('mechanics-online', {
    presence: { key: userId, meta: { name: auth.name, user_id: userId, online_at: new Date().toISOString() } },
    onPresence: () => watch.renderPresence(),
  });
  watch.attach({ socket, queueChannel, presenceChannel });
  socket.connect();
  // Not waiting for realtime: if it never comes up, polling starts after 10 s, and the
  // flags and the active session must be known by then.
  flags.load();
  session.load().catch(() => {});
  setInterval(() => {
    watch.update();
    view.tickAges();
  }, 1000);
  flags.render();
}
