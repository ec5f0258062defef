// Session chat between the customer and the accepted mechanic, while the session runs.
// Messages are loaded once (GET /api/sessions/{id}/messages) and then arrive as
// `session_messages` row events; both paths are merged by message id, so a message sent
// here and echoed by realtime shows once.

import { request, ApiError } from './api.js';
import { h, formatTime, setStatus } from './dom.js';

export function createChat(container, auth) {
  const log = h('ol', { class: 'chat-log', role: 'log', 'aria-live': 'polite', 'aria-label': 'Conversation' });
  const input = h('textarea', { id: 'chat-input', name: 'body', rows: '2', maxlength: '2000', required: true });
  const send = h('button', { type: 'submit' }, 'Send');
  const status = h('p', { class: 'status', role: 'status', hidden: true });
  const form = h('form', { class: 'chat-form' },
    h('label', { for: 'chat-input' }, 'Message'), input, send, status);
  container.replaceChildren(h('h2', {}, 'Chat'), log, form);
  container.hidden = true;

  let sessionId = null;
  const shown = new Set();

  function render(message) {
    if (!message || shown.has(message.id) || message.session_id !== sessionId) return;
    shown.add(message.id);
    const mine = auth.user && message.sender_id === auth.user.id;
    const item = h('li', { class: mine ? 'chat-message mine' : 'chat-message', dataset: { messageId: message.id } },
      h('p', { class: 'chat-meta' },
        h('span', { class: 'chat-sender' }, mine ? 'You' : message.sender_name),
        ' · ',
        h('time', { datetime: message.created_at }, formatTime(message.created_at))),
      h('p', { class: 'chat-body' }, message.body));
    // Keep order by time even when a realtime echo and the history load interleave.
    const at = Date.parse(message.created_at);
    const later = [...log.children].find((li) => Date.parse(li.querySelector('time').getAttribute('datetime')) > at);
    log.insertBefore(item, later || null);
    log.scrollTop = log.scrollHeight;
  }

  async function load() {
    const id = sessionId;
    try {
      const body = await request(`/api/sessions/${id}/messages`, { auth });
      if (id !== sessionId) return;
      for (const message of body.items || []) render(message);
    } catch (error) {
      if (id !== sessionId) return;
      setStatus(status, `Could not load earlier messages: ${error.message}`, 'error');
    }
  }

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text || !sessionId || send.disabled) return;
    send.disabled = true;
    try {
      const body = await request(`/api/sessions/${sessionId}/messages`, {
        method: 'POST', body: { body: text }, auth,
      });
      input.value = '';
      setStatus(status, '');
      render(body && body.message);
    } catch (error) {
      const why = error instanceof ApiError ? error.message : String(error);
      setStatus(status, `Not sent: ${why}`, 'error');
    } finally {
      send.disabled = false;
      input.focus();
    }
  });

  input.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey) {
      event.preventDefault();
      form.requestSubmit();
    }
  });

  return {
    /** Open the chat for a session (waiting or live); null closes it. */
    open(id) {
      if (id === sessionId) return;
      sessionId = id;
      shown.clear();
      log.replaceChildren();
      setStatus(status, '');
      container.hidden = !id;
      if (id) load();
    },
    close() {
      this.open(null);
    },
    /** A session_messages row event. */
    onEvent(data) {
      if (data.type === 'INSERT' && data.record) render(data.record);
    },
    get sessionId() {
      return sessionId;
    },
  };
}
