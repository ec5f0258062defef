// The mechanic's queue on screen: one card per request in #queue-list (kept in the
// store's order, rebuilt only when a status changes), their ages and offer deadlines,
// the count, the empty note, and the queue's status line. Reads the store; changes
// nothing in it (the buttons call the actions the page passes in).

import { h, $, show, setStatus, formatAge, ageSince, describeRequest } from './dom.js';

/** The queue's status line (#queue-message). */
export function queueMessage(text, kind) {
  setStatus($('#queue-message'), text, kind);
}

/**
 * @param {object} options
 * @param {QueueStore} options.store
 * @param {(assignment: object, button: HTMLButtonElement) => void} options.onAccept
 * @param {(assignment: object, button: HTMLButtonElement) => void} options.onDecline
 */
export function createQueueView({ store, onAccept, onDecline }) {
  const cards = new Map(); // assignment id -> li

  function render() {
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
    accept.addEventListener('click', () => onAccept(assignment, accept));
    const actions = [accept];
    if (offered) {
      const decline = h('button', { type: 'button', class: 'secondary decline', 'aria-describedby': titleId }, 'Decline');
      decline.addEventListener('click', () => onDecline(assignment, decline));
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

  /** Highlight a card for a few seconds (it was just alerted). */
  function markNew(id) {
    const card = cards.get(id);
    if (card) {
      card.classList.add('new');
      setTimeout(() => card.classList.remove('new'), 4000);
    }
  }

  /** Scroll to a card and focus its Accept button (an alert's View). */
  function focusCard(id) {
    const card = cards.get(id);
    if (card) {
      card.scrollIntoView({ block: 'center' });
      card.querySelector('button.accept').focus();
    }
  }

  return { render, tickAges, markNew, focusCard };
}
