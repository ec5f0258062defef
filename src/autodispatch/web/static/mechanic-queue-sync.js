// Keeping the mechanic's queue right: live row events, the catch-up after every
// (re)subscribe, and the polls while realtime is down.
//
// Realtime first, then the snapshot. After every (re)subscribe the page fetches GET
// /api/mechanic/queue and re-applies the events that arrived while it was loading, so
// nothing committed around the fetch is lost; rows keep the id of their last event, so
// an older event never overwrites a newer state. When catch-ups overlap (a rejoin while
// one loads), only the latest one's snapshot applies (CatchUp). A poll that is still
// loading when realtime comes back is dropped: the catch-up owns the queue then.

import { request } from './api.js';
import { CatchUp } from './queue-state.js';
import { queueMessage } from './mechanic-queue-view.js';

/**
 * @param {object} options
 * @param {object} options.auth
 * @param {QueueStore} options.store
 * @param {{render: () => void}} options.view
 * @param {object} options.alerting    from mechanic-alerting.js
 * @param {{load: () => Promise<void>}} options.session
 * @param {{load: () => Promise<void>}} options.flags
 * @param {ReceiptOutbox} options.outbox
 * @param {() => boolean} options.isSubscribed  is the queue channel subscribed?
 */
export function createQueueSync({ auth, store, view, alerting, session, flags, outbox, isSubscribed }) {
  const catchUps = new CatchUp(); // the queue's snapshot reads

  /** A session_assignments row event from the queue channel. */
  function onEvent(data) {
    const catchingUp = catchUps.note(data);
    apply(data, !catchingUp);
  }

  function apply(data, live) {
    const { kind, assignment } = store.applyEvent(data);
    alerting.noteChange(kind, assignment, data);
    // The card first, then the alert (which highlights it and whose View focuses it).
    // An assignment we accepted leaves the queue; the session events bring the panel.
    view.render();
    if (live && (kind === 'added' || kind === 'updated')) alerting.maybeAlert(assignment, data);
  }

  async function catchUp() {
    const load = catchUps.begin();
    let queue;
    try {
      [queue] = await Promise.all([
        request('/api/mechanic/queue', { auth }),
        session.load(),
        flags.load(),
      ]);
    } catch (error) {
      const events = catchUps.finish(load);
      if (events === null) return; // a newer catch-up is loading: it reports for itself
      // The events that came meanwhile are on the page already; alert them now.
      for (const data of events) {
        const id = data.record && data.record.id;
        if (store.items.has(id)) alerting.maybeAlert(store.items.get(id), data);
      }
      queueMessage(`Could not load the queue: ${error.message}. Retrying…`, 'error');
      setTimeout(() => {
        if (catchUps.isCurrent(load) && isSubscribed()) catchUp();
      }, 3000);
      return;
    }
    // A newer catch-up started while this one loaded: this snapshot may be older than
    // events already applied, and the newer one keeps them. Drop it.
    const events = catchUps.finish(load);
    if (events === null) return;
    store.applySnapshot(queue.items || []);
    for (const data of events) apply(data, false);
    view.render();
    alerting.alertUnseen();
    queueMessage('');
    outbox.retry();
  }

  /** One poll; `stillWanted()` says, once it has loaded, whether polling still goes on. */
  async function poll(stillWanted) {
    try {
      const [queue] = await Promise.all([
        request('/api/mechanic/queue', { auth, timeoutMs: 8000 }),
        flags.load(), // flag changes made while realtime is down apply too
      ]);
      // Realtime came back meanwhile: its catch-up and live events own the queue.
      if (!stillWanted() || catchUps.active) return;
      store.applySnapshot(queue.items || []);
      view.render();
      alerting.alertUnseen();
      queueMessage('');
    } catch (error) {
      queueMessage(`Could not check for requests: ${error.message}`, 'error');
    }
  }

  return { onEvent, catchUp, poll };
}
