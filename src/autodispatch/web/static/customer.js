// The customer page: sign up or in, describe the car, sign the waiver (and pay), then
// follow the request live: waiting for a mechanic → "<name> accepted" → live → ended.
// The banner shows while a session is open and goes the moment it ends, from either
// side: the session and assignment row events say so (a page that was disconnected
// resumes from its cursor and re-reads the session).
// A read of the session is shown only if it is the latest one and no session event came
// while it loaded (the read may be older than the event; it is read again); an action's
// answer is newer than any read in flight.

import { request, ApiError, getConfig } from './api.js';
import { $, show, setStatus, announcer } from './dom.js';
import { setupSession, openSocket } from './shell.js';
import { createChat } from './chat.js';

const TITLE = 'Talk to a mechanic · autodispatch';
const OPEN = new Set(['pending', 'waiting', 'live']);

const session = setupSession({
  namespace: 'customer',
  roles: ['customer'],
  pageName: TITLE,
  onSignedIn: (auth) => {
    show($('#signed-out'), false);
    start(auth).catch((error) => {
      console.error(error);
      setStatus($('#request-status'), `The page failed to start: ${error.message}`, 'error');
    });
  },
});
if (!session.signedIn()) show($('#signed-out'));

$('#signup').addEventListener('submit', async (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  const status = $('#signup-status');
  const name = form.elements.name.value.trim();
  const email = form.elements.email.value.trim();
  const password = form.elements.password.value;
  if (!name || !email || password.length < 8) {
    setStatus(status, 'Enter your name, your email and a password of at least 8 characters.', 'error');
    return;
  }
  const button = form.querySelector('button');
  button.disabled = true;
  try {
    await session.auth.signUp(email, password, name);
    session.enter();
  } catch (error) {
    setStatus(status, `Could not create the account: ${error.message}`, 'error');
  } finally {
    button.disabled = false;
  }
});

function statusText(pair) {
  const { session: s, assignment: a } = pair;
  const mechanic = a.mechanic_name || 'A mechanic';
  if (s.status === 'live') return `Live with ${mechanic}`;
  if (s.status === 'waiting' || a.status === 'accepted') return `${mechanic} accepted`;
  if (a.status === 'pending_waiver') {
    return s.type === 'paid' ? 'Sign the waiver and pay to send your request.' : 'Sign the waiver to send your request.';
  }
  if (a.status === 'queued' || a.status === 'offered') return 'Waiting for a mechanic…';
  return s.status;
}

function endedText(pair) {
  const { session: s, assignment: a } = pair;
  if (s.status === 'completed') return `Your session with ${a.mechanic_name || 'the mechanic'} is complete.`;
  if (a.status === 'expired') return 'No mechanic was free in time, so the request expired. You can ask again.';
  return 'The request was cancelled.';
}

async function start(auth) {
  const announce = announcer($('#announcer'));
  const chat = createChat($('#chat'), auth);
  const config = await getConfig().catch(() => ({ stripe_enabled: false }));
  let current = null; // {session, assignment}
  let sessionEvents = 0; // session and assignment events seen
  let reads = 0; // the latest read shows; older ones do not
  const done = { waiver: new Set(), payment: new Set() }; // steps this page saw complete

  show($('#app'));
  const firstName = (auth.name || '').split(/\s+/)[0];
  if (firstName) $('#intake-name').value = firstName;

  function setCurrent(pair) {
    const before = current;
    if (pair && !OPEN.has(pair.session.status)) {
      current = null;
      render();
      if (before && before.session.id === pair.session.id) showEnded(pair);
      return;
    }
    current = pair;
    render();
    if (pair && (!before || statusText(before) !== statusText(pair))) announce(statusText(pair));
  }

  function showEnded(pair) {
    $('#ended-text').textContent = endedText(pair);
    show($('#ended'));
    show($('#request-form'), false);
    announce(`Session ended. ${endedText(pair)}`);
    $('#ended-title').focus();
  }

  function render() {
    const banner = $('#banner');
    if (!current) {
      show(banner, false);
      delete banner.dataset.sessionId;
      show($('#session-panel'), false);
      chat.close();
      if ($('#ended').hidden) show($('#request-form'));
      return;
    }
    const { session: s, assignment: a } = current;
    const text = statusText(current);
    show($('#request-form'), false);
    show($('#ended'), false);
    show($('#session-panel'));
    const summary = a.request_summary || {};
    $('#session-summary').textContent = [summary.vehicle, summary.concern].filter(Boolean).join(' · ');
    $('#session-status').textContent = text;
    $('#banner-title').textContent = s.status === 'live' ? 'Live session:' : 'Your request:';
    $('#banner-text').textContent = text;
    banner.dataset.sessionId = s.id;
    banner.dataset.status = s.status;
    show(banner);

    const pendingWaiver = a.status === 'pending_waiver';
    show($('#waiver'), pendingWaiver && !done.waiver.has(s.id));
    const needsPayment = pendingWaiver && s.type === 'paid' && !done.payment.has(s.id);
    show($('#payment'), needsPayment);
    if (needsPayment) {
      $('#payment-text').textContent = config.stripe_enabled
        ? 'Complete the payment in the Stripe checkout; this page updates when Stripe confirms it.'
        : 'This server has no Stripe account: confirm the payment with the development button.';
      show($('#payment-confirm'), !config.stripe_enabled);
    }
    show($('#session-start'), s.status === 'waiting');
    show($('#session-end'), s.status === 'live');
    show($('#session-cancel'), s.status === 'pending' || s.status === 'waiting');
    if (s.status === 'waiting' || s.status === 'live') chat.open(s.id);
    else chat.close();
  }

  async function readCurrent() {
    const sessions = await request('/api/sessions', { auth });
    const open = (sessions.items || []).find((s) => OPEN.has(s.status));
    if (open) return request(`/api/sessions/${open.id}`, { auth });
    // It ended while we were not listening: read how.
    if (current) return request(`/api/sessions/${current.session.id}`, { auth });
    return null;
  }

  async function loadCurrent() {
    const read = ++reads;
    for (let tries = 0; tries < 3; tries += 1) {
      const seen = sessionEvents;
      const pair = await readCurrent();
      if (read !== reads) return; // a newer read (or an action's answer) shows
      if (seen === sessionEvents) {
        if (pair) setCurrent(pair);
        else render();
        return;
      }
      // An event came during the read: the read may be older. Read again (after three
      // tries, the events keep the page current on their own).
    }
  }

  /** Show the answer of an action: newer than any read in flight. */
  async function afterAction(answer) {
    const seen = sessionEvents;
    const pair = await answer;
    reads += 1;
    setCurrent(pair);
    if (seen !== sessionEvents) loadCurrent().catch(() => {});
    return pair;
  }

  function onEvent(data) {
    if (data.table === 'session_messages') {
      chat.onEvent(data);
      return;
    }
    sessionEvents += 1;
    const record = data.type === 'DELETE' ? data.old_record : data.record;
    if (!record) return;
    const sessionId = data.table === 'sessions' ? record.id : record.session_id;
    if (current && current.session.id === sessionId) {
      const key = data.table === 'sessions' ? 'session' : 'assignment';
      setCurrent({ ...current, [key]: { ...current[key], ...record } });
    } else if (!current && data.table === 'sessions' && OPEN.has(record.status)) {
      // A request made in another tab.
      loadCurrent().catch(() => {});
    }
  }

  function message(text, kind = 'info') {
    setStatus($('#session-message'), text, kind);
  }

  async function act(button, path, { body, onError } = {}) {
    button.disabled = true;
    message('');
    try {
      return await afterAction(request(path, { method: 'POST', auth, body }));
    } catch (error) {
      if (!onError || !onError(error)) message(error.message, 'error');
      return null;
    } finally {
      button.disabled = false;
    }
  }

  $('#request-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    const form = event.currentTarget;
    const status = $('#request-status');
    const f = form.elements;
    const intake = {
      name: f.name.value.trim(),
      vehicle_year: Number(f.vehicle_year.value),
      vehicle_make: f.vehicle_make.value.trim(),
      vehicle_model: f.vehicle_model.value.trim(),
      concern: f.concern.value.trim(),
    };
    const missing = Object.entries(intake).filter(([, v]) => !v).map(([k]) => form.querySelector(`[name="${k}"]`).labels[0].textContent);
    if (missing.length) {
      setStatus(status, `Please fill in: ${missing.join(', ')}.`, 'error');
      return;
    }
    const button = form.querySelector('button[type="submit"]');
    button.disabled = true;
    try {
      const answer = request('/api/sessions', {
        method: 'POST', auth, body: { type: f.type.value, intake },
      });
      await afterAction(answer);
      setStatus(status, '');
      form.reset();
      if (firstName) $('#intake-name').value = firstName;
      $('#session-title').focus();
    } catch (error) {
      setStatus(status, `Not sent: ${error.message}`, 'error');
    } finally {
      button.disabled = false;
    }
  });

  $('#waiver-sign').addEventListener('click', async (event) => {
    if (!current) return;
    if (!$('#waiver-agree').checked) {
      message('Tick "I have read and agree to the waiver" first.', 'error');
      $('#waiver-agree').focus();
      return;
    }
    const id = current.session.id;
    const pair = await act(event.currentTarget, `/api/sessions/${id}/waiver`, {
      onError: (error) => {
        if (error instanceof ApiError && error.code === 'waiver_already_signed') {
          done.waiver.add(id);
          render();
          return true;
        }
        return false;
      },
    });
    if (pair) {
      done.waiver.add(id);
      render();
    }
  });

  $('#payment-confirm').addEventListener('click', async (event) => {
    if (!current) return;
    const id = current.session.id;
    const pair = await act(event.currentTarget, `/api/dev/sessions/${id}/confirm-payment`, {
      onError: (error) => {
        if (error instanceof ApiError && error.code === 'already_paid') {
          done.payment.add(id);
          render();
          return true;
        }
        return false;
      },
    });
    if (pair) {
      done.payment.add(id);
      render();
    }
  });

  $('#session-start').addEventListener('click', (e) => current && act(e.currentTarget, `/api/sessions/${current.session.id}/start`));
  $('#session-end').addEventListener('click', (e) => current && act(e.currentTarget, `/api/sessions/${current.session.id}/end`));
  $('#session-cancel').addEventListener('click', (e) => current && act(e.currentTarget, `/api/sessions/${current.session.id}/cancel`));
  $('#new-request').addEventListener('click', () => {
    show($('#ended'), false);
    render();
    $('#intake-name').focus();
  });

  const socket = await openSocket(auth);
  socket.channel(`customer:${auth.user.id}`, {
    changes: [
      { event: '*', schema: 'public', table: 'sessions' },
      { event: '*', schema: 'public', table: 'session_assignments' },
      { event: 'INSERT', schema: 'public', table: 'session_messages' },
    ],
    onChange: onEvent,
    onStatus: (status) => {
      if (status === 'subscribed') {
        loadCurrent().catch((error) => message(`Could not load your request: ${error.message}`, 'error'));
      }
    },
    onTokenRejected: () => auth.refresh(),
  });
  socket.connect();
  render();
}
