// What a mechanic does with a request card: accept it (the answer is the new active
// session) or decline an offer (the request goes back to the open queue), and what the
// queue's status line says about each outcome.

import { request, ApiError } from './api.js';
import { $, describeRequest } from './dom.js';
import { queueMessage } from './mechanic-queue-view.js';

/**
 * @param {object} options
 * @param {object} options.auth
 * @param {QueueStore} options.store
 * @param {{render: () => void}} options.view
 * @param {{afterAction: (answer: Promise<object>) => Promise<object>}} options.session
 */
export function createQueueActions({ auth, store, view, session }) {
  async function accept(assignment, button) {
    button.disabled = true;
    queueMessage('Accepting…');
    try {
      await session.afterAction(request(`/api/assignments/${assignment.id}/accept`, { method: 'POST', auth }));
      store.remove(assignment.id);
      view.render();
      queueMessage(`You accepted ${describeRequest(assignment.request_summary)}.`, 'ok');
      $('#active-title').focus();
    } catch (error) {
      button.disabled = false;
      if (error instanceof ApiError && error.code === 'already_taken') {
        store.remove(assignment.id);
        view.render();
        queueMessage('Another mechanic took this request.', 'error');
      } else if (error instanceof ApiError && error.status === 409) {
        store.remove(assignment.id);
        view.render();
        queueMessage(`This request can no longer be accepted: ${error.message}`, 'error');
      } else if (error instanceof ApiError && error.status === 0) {
        queueMessage('Could not reach the server: the request was not accepted. Try again.', 'error');
      } else {
        queueMessage(`Not accepted: ${error.message}`, 'error');
      }
    }
  }

  async function decline(assignment, button) {
    button.disabled = true;
    try {
      await request(`/api/assignments/${assignment.id}/decline`, { method: 'POST', auth });
      queueMessage('Offer declined: the request went back to the open queue.', 'ok');
    } catch (error) {
      button.disabled = false;
      queueMessage(`Not declined: ${error.message}`, 'error');
    }
  }

  return { accept, decline };
}
