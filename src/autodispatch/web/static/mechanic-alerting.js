// When the mechanic page alerts, and once only. A request is alerted once per browser:
// its key is claimed in AlertMemory (localStorage) before the alert runs, whichever
// path (live event, replay, snapshot, poll) saw it first. The first time a mechanic
// opens the page in a browser, requests already waiting are listed without alerting
// (they are not new); on every later visit, requests that came in while the page was
// closed alert once. An alert raised by a read (a poll, a snapshot) has no event in
// hand: its receipt names the request, and the server finds the event. How an alert
// looks and sounds is alerts.js; this module decides whether and with which event.

import { describeRequest } from './dom.js';
import { alertKey } from './queue-state.js';

/**
 * @param {object} options
 * @param {QueueStore} options.store
 * @param {AlertMemory} options.memory
 * @param {object} options.alerter     from alerts.js createAlerter
 * @param {{current: object|null}} options.flags  alerts wait while this is null
 * @param {(text: string) => void} options.announce
 * @param {{markNew: (id: string) => void}} options.view
 */
export function createAlerting({ store, memory, alerter, flags, announce, view }) {
  const enterEvents = new Map(); // assignment id -> the event that put it in the queue
  let pendingAlerts = []; // waiting for the flags
  let firstCatchUp = memory.isNew;

  /** Remember which event put an assignment in the queue (its alert's receipt names it). */
  function noteChange(kind, assignment, data) {
    if (kind === 'removed') enterEvents.delete(assignment.id);
    if (kind === 'added' || kind === 'updated') {
      const before = enterEvents.get(assignment.id);
      if (kind === 'added' || !before || assignment.status === 'offered') {
        enterEvents.set(assignment.id, { event_id: data.event_id, commit_timestamp: data.commit_timestamp });
      }
    }
  }

  function maybeAlert(assignment, event) {
    const key = alertKey(assignment);
    // An offer alert also covers the request itself (no second alert after a decline).
    const keys = assignment.status === 'offered' ? [key, `request:${assignment.id}`] : [key];
    if (!memory.claim(keys)) return;
    view.markNew(assignment.id);
    const summary = assignment.request_summary || {};
    announce(`${assignment.status === 'offered' ? 'Request offered to you' : 'New request'}: ${describeRequest(summary)}. ${summary.concern || ''}`);
    if (flags.current === null) {
      pendingAlerts.push([assignment, event]);
      return;
    }
    alerter.alert(assignment, flags.current, event);
  }

  /** The flags are known: alert what waited for them. */
  function flushPending() {
    const waiting = pendingAlerts;
    pendingAlerts = [];
    for (const [assignment, event] of waiting) {
      // Only what is still takeable: a request gone meanwhile is not worth an alert.
      if (store.items.has(assignment.id)) alerter.alert(store.items.get(assignment.id), flags.current, event);
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

  return { noteChange, maybeAlert, flushPending, alertUnseen };
}
