// What every page shares: the sign-in form, the account bar, the connection indicator
// and opening the realtime socket for the signed-in user.

import { Auth, getConfig, ApiError } from './api.js';
import { RealtimeSocket, socketUrl, PHASE } from './realtime.js';
import { $, setStatus } from './dom.js';

const ROLE_NAMES = { customer: 'a customer', mechanic: 'a mechanic', admin: 'an admin' };

/** Page-level settings a test (or a curious operator) may set in the query string. */
export function pageOption(name, fallback) {
  const value = new URLSearchParams(window.location.search).get(name);
  const number = value === null ? NaN : Number(value);
  return Number.isFinite(number) && number > 0 ? number : fallback;
}

/**
 * Wire the page's sign-in form (#signin) and account bar (#account).
 * `roles`: the account types this page is for. Calls onSignedIn(auth) once signed in
 * (at once when a stored session exists).
 */
export function setupSession({ namespace, roles, pageName, onSignedIn, beforeSignOut = null }) {
  const auth = new Auth(namespace);
  const form = $('#signin');
  const status = $('#signin-status');
  const account = $('#account');
  const accountName = $('#account-name');
  let started = false;

  const allowed = () => roles.includes(auth.accountType);

  function enter() {
    if (started || !auth.session) return;
    if (!allowed()) {
      const role = ROLE_NAMES[auth.accountType] || 'another kind of account';
      setStatus(status, `This page is for ${roles.map((r) => ROLE_NAMES[r]).join(' or ')}; ${auth.user.email} is ${role}. Open ${pageFor(auth.accountType)} instead.`, 'error');
      auth.signOut();
      return;
    }
    started = true;
    form.hidden = true;
    accountName.textContent = `${auth.name} (${auth.user.email})`;
    account.hidden = false;
    onSignedIn(auth);
  }

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const button = form.querySelector('button[type="submit"]');
    const email = form.elements.email.value.trim();
    const password = form.elements.password.value;
    if (!email || !password) {
      setStatus(status, 'Enter your email and password.', 'error');
      return;
    }
    button.disabled = true;
    setStatus(status, 'Signing in…');
    try {
      await auth.signIn(email, password);
      setStatus(status, '');
      enter();
    } catch (error) {
      const why = error instanceof ApiError && error.code === 'invalid_credentials'
        ? 'Wrong email or password.'
        : `Could not sign in: ${error.message}`;
      setStatus(status, why, 'error');
    } finally {
      button.disabled = false;
    }
  });

  $('#signout').addEventListener('click', async (event) => {
    event.currentTarget.disabled = true;
    if (beforeSignOut) {
      await Promise.race([
        Promise.resolve().then(() => beforeSignOut(auth)).catch(() => {}),
        new Promise((resolve) => setTimeout(resolve, 4000)),
      ]);
    }
    await auth.signOut();
    window.location.reload();
  });

  auth.onChange((session) => {
    if (!session && started) {
      // Signed out here or in another tab, or the session could not be refreshed.
      window.location.reload();
    }
  });

  document.title = pageName;
  if (auth.session) enter();
  else form.hidden = false;
  return { auth, enter, signedIn: () => started };
}

function pageFor(accountType) {
  return { customer: '/customer', mechanic: '/mechanic', admin: '/admin' }[accountType] || '/probe';
}

const PHASE_TEXT = {
  [PHASE.CONNECTING]: 'Connecting…',
  [PHASE.JOINING]: 'Connecting…',
  [PHASE.LIVE]: 'Live',
  [PHASE.RECONNECTING]: 'Reconnecting…',
  [PHASE.OFFLINE]: 'Offline: no network',
  [PHASE.CLOSED]: 'Disconnected',
};

/** Show the realtime state in #connection (role=status). `note` adds e.g. polling. */
export function renderConnection(state, note = '') {
  const element = $('#connection');
  if (!element) return;
  const text = PHASE_TEXT[state.phase] || state.phase;
  const full = note ? `${text} · ${note}` : text;
  if (element.textContent !== full) element.textContent = full;
  element.dataset.state = state.phase;
}

/** The realtime socket for this user (apikey: the anon key; channels carry the token). */
export async function openSocket(auth, { onState, log } = {}) {
  const config = await getConfig();
  const socket = new RealtimeSocket({
    url: socketUrl(config.anon_key),
    token: () => auth.accessToken,
    onState: (state) => {
      renderConnection(state);
      if (onState) onState(state);
    },
    log: log || (() => {}),
    heartbeatMs: pageOption('heartbeat_ms', 25000),
  });
  auth.onChange((session) => {
    if (session) socket.setAccessToken(session.access_token);
  });
  return socket;
}
