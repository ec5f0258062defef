// Talking to the API: sign-in and token keeping, and a fetch wrapper that turns every
// failure into an ApiError with the server's {"error": {"code", "message"}}.
//
// Tokens live in localStorage under one key per page ("autodispatch.auth.mechanic", ...):
// a mechanic stays signed in across restarts of the browser (so a request that came in
// while the page was closed is there on return), tabs of one page share the session,
// and the mechanic and customer pages can be open side by side as different users.
// The pages run no inline or third-party script (see the Content-Security-Policy), which
// is what keeps a token in localStorage from being read by anyone else. Refresh tokens
// rotate (each works once), so refreshing is serialised across tabs with a Web Lock and
// a tab adopts a token another tab refreshed.

const REFRESH_MARGIN_S = 60;

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
  }
}

async function readError(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON
  }
  const error = body && body.error;
  if (error && typeof error === 'object' && error.code) {
    return new ApiError(response.status, String(error.code), String(error.message || error.code));
  }
  const detail = body && (body.detail || body.error);
  return new ApiError(response.status, `http_${response.status}`,
    typeof detail === 'string' ? detail : `the server answered ${response.status} ${response.statusText}`);
}

/**
 * fetch + JSON + errors. Resolves with the JSON body (null for 204); rejects with ApiError
 * (status 0 and code network_error / timeout when the server could not be reached).
 */
export async function request(path, { method = 'GET', body, auth = null, timeoutMs = 15000,
  retryOnUnauthorized = true } = {}) {
  const headers = { Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (auth && auth.accessToken) headers.Authorization = `Bearer ${auth.accessToken}`;
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeoutMs);
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: controller.signal,
      cache: 'no-store',
      credentials: 'omit',
    });
  } catch (error) {
    if (error && error.name === 'AbortError') {
      throw new ApiError(0, 'timeout', `the server did not answer within ${timeoutMs / 1000} s`);
    }
    throw new ApiError(0, 'network_error', 'could not reach the server (are you offline?)');
  } finally {
    clearTimeout(timer);
  }
  if (response.status === 401 && auth && retryOnUnauthorized && auth.refreshToken) {
    // An expired access token: refresh once and try again.
    if (await auth.refresh()) {
      return request(path, { method, body, auth, timeoutMs, retryOnUnauthorized: false });
    }
  }
  if (!response.ok) throw await readError(response);
  if (response.status === 204) return null;
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

let configPromise = null;

/** GET /api/config, once per page (the anon key realtime needs as apikey). */
export function getConfig() {
  if (!configPromise) {
    configPromise = request('/api/config').catch((error) => {
      configPromise = null;
      throw error;
    });
  }
  return configPromise;
}

/** One signed-in session, kept in localStorage under "autodispatch.auth.<namespace>". */
export class Auth {
  constructor(namespace, storage = window.localStorage) {
    this.key = `autodispatch.auth.${namespace}`;
    this.storage = storage;
    this.listeners = new Set();
    this.timer = null;
    this.session = this._read();
    window.addEventListener('storage', (event) => {
      if (event.key !== this.key) return;
      this.session = this._read();
      this._changed();
    });
    this._schedule();
  }

  get user() {
    return this.session ? this.session.user : null;
  }

  get accessToken() {
    return this.session ? this.session.access_token : null;
  }

  get refreshToken() {
    return this.session ? this.session.refresh_token : null;
  }

  get accountType() {
    const user = this.user;
    return user && user.app_metadata ? user.app_metadata.account_type : null;
  }

  get name() {
    const user = this.user;
    return (user && user.user_metadata && user.user_metadata.name) || (user && user.email) || '';
  }

  onChange(listener) {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  async signIn(email, password) {
    const session = await request('/auth/v1/token?grant_type=password', {
      method: 'POST',
      body: { email, password },
    });
    this._store(session);
    return session;
  }

  async signUp(email, password, name) {
    const session = await request('/auth/v1/signup', {
      method: 'POST',
      body: { email, password, data: { name } },
    });
    this._store(session);
    return session;
  }

  async signOut() {
    const token = this.accessToken;
    this._store(null);
    if (token) {
      // Revoke the refresh tokens; the page is signed out whatever the answer.
      fetch('/auth/v1/logout', { method: 'POST', headers: { Authorization: `Bearer ${token}` } })
        .catch(() => {});
    }
  }

  /** Refresh the access token; true when this tab now holds a valid one. */
  async refresh() {
    const run = () => this._refreshOnce();
    if (navigator.locks && navigator.locks.request) {
      return navigator.locks.request(this.key, run);
    }
    return run();
  }

  async _refreshOnce() {
    const mine = this.refreshToken;
    const stored = this._read();
    if (stored && stored.refresh_token !== mine && !expiresSoon(stored)) {
      // Another tab refreshed meanwhile: use its token.
      this.session = stored;
      this._changed();
      return true;
    }
    if (!mine) return false;
    try {
      const session = await request('/auth/v1/token?grant_type=refresh_token', {
        method: 'POST',
        body: { refresh_token: mine },
        retryOnUnauthorized: false,
      });
      this._store(session);
      return true;
    } catch (error) {
      if (error instanceof ApiError && error.status !== 0) {
        const again = this._read();
        if (again && again.refresh_token !== mine) {
          this.session = again;
          this._changed();
          return true;
        }
        this._store(null); // the refresh token is spent or revoked: sign in again
      } else {
        clearTimeout(this.timer); // unreachable: try again shortly
        this.timer = setTimeout(() => this.refresh(), 10000);
      }
      return false;
    }
  }

  _read() {
    try {
      const raw = this.storage.getItem(this.key);
      return raw ? JSON.parse(raw) : null;
    } catch {
      return null;
    }
  }

  _store(session) {
    this.session = session;
    try {
      if (session) this.storage.setItem(this.key, JSON.stringify(session));
      else this.storage.removeItem(this.key);
    } catch {
      // storage full or blocked: the session still lives in memory
    }
    this._changed();
  }

  _changed() {
    this._schedule();
    for (const listener of this.listeners) {
      try {
        listener(this.session);
      } catch (error) {
        console.error('auth listener failed', error);
      }
    }
  }

  _schedule() {
    clearTimeout(this.timer);
    if (!this.session || !this.session.expires_at) return;
    const inMs = (this.session.expires_at - refreshMargin(this.session)) * 1000 - Date.now();
    this.timer = setTimeout(() => this.refresh(), Math.max(1000, inMs));
  }
}

/** Refresh a minute early, or a fifth of the token's life early when it lives < 5 min. */
function refreshMargin(session) {
  return Math.min(REFRESH_MARGIN_S, (session.expires_in || 3600) / 5);
}

function expiresSoon(session) {
  return !session.expires_at || session.expires_at * 1000 - Date.now() < refreshMargin(session) * 1000;
}
