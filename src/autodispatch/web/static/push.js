// The mechanic page's service worker (Web Push for when the page is closed).
// Registering it asks nothing of the user; subscribing to push happens only after the
// mechanic clicked "Enable notifications" and granted the permission.

import { request } from './api.js';

export const WORKER_URL = '/mechanic-sw.js';
export const WORKER_SCOPE = '/mechanic';

export async function registerServiceWorker() {
  if (!('serviceWorker' in navigator)) return null;
  return navigator.serviceWorker.register(WORKER_URL, { scope: WORKER_SCOPE, type: 'classic' });
}

function base64UrlToBytes(text) {
  const padded = text.replace(/-/g, '+').replace(/_/g, '/') + '='.repeat((4 - (text.length % 4)) % 4);
  const raw = atob(padded);
  return Uint8Array.from(raw, (c) => c.charCodeAt(0));
}

/** Subscribe this browser to push for the signed-in mechanic: {ok, reason}. */
export async function subscribeToPush(auth) {
  if (!('serviceWorker' in navigator) || !('PushManager' in window)) {
    return { ok: false, reason: 'this browser has no Web Push' };
  }
  try {
    const registration = (await registerServiceWorker()) || (await navigator.serviceWorker.ready);
    const { public_key: publicKey } = await request('/api/push/public-key', { auth });
    let subscription = await registration.pushManager.getSubscription();
    if (!subscription) {
      subscription = await registration.pushManager.subscribe({
        userVisibleOnly: true,
        applicationServerKey: base64UrlToBytes(publicKey),
      });
    }
    const json = subscription.toJSON();
    await request('/api/push/subscriptions', {
      method: 'POST',
      auth,
      body: { endpoint: json.endpoint, keys: { p256dh: json.keys.p256dh, auth: json.keys.auth } },
    });
    return { ok: true, reason: '' };
  } catch (error) {
    return { ok: false, reason: error && error.message ? error.message : String(error) };
  }
}

/** Forget this browser's push subscription (on sign-out). Never throws. */
export async function unsubscribeFromPush(auth) {
  try {
    if (!('serviceWorker' in navigator)) return;
    const registration = await navigator.serviceWorker.getRegistration(WORKER_SCOPE);
    const subscription = registration && (await registration.pushManager.getSubscription());
    if (!subscription) return;
    await request('/api/push/subscriptions', {
      method: 'DELETE', auth, body: { endpoint: subscription.endpoint }, timeoutMs: 3000,
    }).catch(() => {});
    await subscription.unsubscribe();
  } catch {
    // signing out must not fail because of push
  }
}
