// New-request alerts: five tiers, each isolated, and a receipt saying how each went.
//
// The tiers are toast (always, when alerts are on), sound (Web Audio), system
// notification, tab title and favicon badge. `mech_new_request_alerts` gates them all;
// `mech_audio_alerts`, `mech_browser_notifications` and `mech_visual_indicators` gate
// one tier each (the last both title and favicon). Every tier runs in its own try/catch
// with a time limit, so one that throws or hangs (a denied notification permission,
// blocked audio) neither stops the others nor the next alert. Nothing here bypasses a
// flag. The receipt reports each tier as shown | failed (with the error) | disabled
// (flag off, or not enabled in this browser) | unsupported (the browser lacks it).

import { h, describeRequest } from './dom.js';

export const TIERS = Object.freeze(['toast', 'sound', 'notification', 'title', 'favicon']);
export const TIER_FLAGS = Object.freeze({
  sound: 'mech_audio_alerts',
  notification: 'mech_browser_notifications',
  title: 'mech_visual_indicators',
  favicon: 'mech_visual_indicators',
});
export const MASTER_FLAG = 'mech_new_request_alerts';
const TIER_TIMEOUT_MS = 2500;
const TOAST_MS = 20000;

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not finish within ${ms} ms`)), ms);
  });
  return Promise.race([Promise.resolve(promise), timeout]).finally(() => clearTimeout(timer));
}

function errorText(error) {
  const text = error && error.message ? error.message : String(error);
  return text.slice(0, 300);
}

// -- sound ------------------------------------------------------------------------------

let audioContext = null;

function AudioContextClass() {
  return window.AudioContext || window.webkitAudioContext || null;
}

/** Call on any click or key press: browsers let audio start only after a user gesture. */
export function unlockAudio() {
  const Klass = AudioContextClass();
  if (!Klass) return;
  try {
    if (!audioContext) audioContext = new Klass();
    if (audioContext.state === 'suspended') audioContext.resume().catch(() => {});
  } catch {
    // the sound tier reports it when it matters
  }
}

async function playBeep() {
  const Klass = AudioContextClass();
  if (!Klass) return { status: 'unsupported', error: 'this browser has no Web Audio' };
  if (!audioContext) audioContext = new Klass();
  if (audioContext.state !== 'running') {
    await Promise.race([audioContext.resume(), new Promise((r) => setTimeout(r, 300))]);
  }
  if (audioContext.state !== 'running') {
    throw new Error('audio is blocked until you click or press a key on the page (browser autoplay policy)');
  }
  const now = audioContext.currentTime;
  for (const [offset, frequency] of [[0, 880], [0.18, 660]]) {
    const oscillator = audioContext.createOscillator();
    const gain = audioContext.createGain();
    oscillator.type = 'sine';
    oscillator.frequency.value = frequency;
    gain.gain.setValueAtTime(0.0001, now + offset);
    gain.gain.exponentialRampToValueAtTime(0.3, now + offset + 0.02);
    gain.gain.exponentialRampToValueAtTime(0.0001, now + offset + 0.16);
    oscillator.connect(gain).connect(audioContext.destination);
    oscillator.start(now + offset);
    oscillator.stop(now + offset + 0.17);
  }
  return { status: 'shown' };
}

// -- system notification ----------------------------------------------------------------

async function showNotification(request) {
  if (!('Notification' in window)) {
    return { status: 'unsupported', error: 'this browser has no notifications' };
  }
  const permission = Notification.permission;
  if (permission === 'default') {
    return { status: 'disabled', error: 'not enabled in this browser (use "Enable notifications")' };
  }
  if (permission !== 'granted') throw new Error(`notification permission is ${permission}`);
  const title = 'New session request';
  const options = {
    body: `${describeRequest(request.request_summary)}\n${(request.request_summary || {}).concern || ''}`,
    tag: `request-${request.id}`, // the service worker's push uses the same tag: one notification
    data: { url: '/mechanic', assignment_id: request.id },
  };
  const registration = navigator.serviceWorker
    ? await withTimeout(navigator.serviceWorker.getRegistration('/mechanic'), 1000, 'service worker lookup')
      .catch(() => null)
    : null;
  if (registration) {
    await registration.showNotification(title, options);
  } else {
    const notification = new Notification(title, options);
    notification.onclick = () => {
      window.focus();
      notification.close();
    };
  }
  return { status: 'shown' };
}

// -- title and favicon ------------------------------------------------------------------

export class Badges {
  constructor(baseTitle) {
    this.baseTitle = baseTitle;
    this.unseen = 0;
    this.icon = document.querySelector('link[rel="icon"]');
    this.baseIcon = this.icon ? this.icon.href : null;
  }

  title() {
    this.unseen += 1;
    document.title = `(${this.unseen}) New request · ${this.baseTitle}`;
    return { status: 'shown' };
  }

  favicon() {
    if (!this.icon) return { status: 'unsupported', error: 'the page has no favicon link' };
    const canvas = document.createElement('canvas');
    canvas.width = 64;
    canvas.height = 64;
    const context = canvas.getContext('2d');
    if (!context) return { status: 'unsupported', error: 'no 2D canvas' };
    context.fillStyle = '#0b5cad';
    context.beginPath();
    context.arc(28, 36, 26, 0, 2 * Math.PI);
    context.fill();
    context.fillStyle = '#c62828';
    context.beginPath();
    context.arc(46, 18, 18, 0, 2 * Math.PI);
    context.fill();
    context.fillStyle = '#ffffff';
    context.font = 'bold 24px sans-serif';
    context.textAlign = 'center';
    context.textBaseline = 'middle';
    context.fillText(this.unseen > 9 ? '9+' : String(Math.max(1, this.unseen)), 46, 19);
    this.icon.href = canvas.toDataURL('image/png');
    this.icon.dataset.badged = 'true';
    return { status: 'shown' };
  }

  /** The mechanic has seen the page: clear the count, the title and the badge. */
  clear() {
    if (this.unseen === 0) return;
    this.unseen = 0;
    document.title = this.baseTitle;
    if (this.icon && this.baseIcon) {
      this.icon.href = this.baseIcon;
      delete this.icon.dataset.badged;
    }
  }
}

// -- toast ------------------------------------------------------------------------------

function showToast(region, request, onView) {
  const summary = request.request_summary || {};
  const offered = request.status === 'offered';
  const close = () => toast.remove();
  const toast = h('div', { class: 'toast', role: 'group', 'aria-label': 'New request', dataset: { assignmentId: request.id } },
    h('p', { class: 'toast-title' }, offered ? 'Offered to you' : 'New request'),
    h('p', {}, describeRequest(summary)),
    summary.concern ? h('p', { class: 'toast-concern' }, summary.concern) : null,
    h('div', { class: 'toast-actions' },
      h('button', { type: 'button', onclick: () => { close(); onView(request); } }, 'View'),
      h('button', { type: 'button', class: 'secondary', onclick: close, 'aria-label': 'Dismiss this alert' }, 'Dismiss')));
  region.prepend(toast);
  let timer = setTimeout(close, TOAST_MS);
  // Keep it while the mechanic hovers or tabs into it.
  toast.addEventListener('mouseenter', () => clearTimeout(timer));
  toast.addEventListener('focusin', () => clearTimeout(timer));
  toast.addEventListener('mouseleave', () => { timer = setTimeout(close, TOAST_MS); });
  return { status: 'shown' };
}

// -- the alert --------------------------------------------------------------------------

async function runTier(name, fn) {
  try {
    const result = await withTimeout(fn(), TIER_TIMEOUT_MS, `the ${name} tier`);
    return result && result.status ? result : { status: 'shown' };
  } catch (error) {
    console.warn(`alert tier ${name} failed`, error);
    return { status: 'failed', error: errorText(error) };
  }
}

/**
 * The alerter of one page.
 * @param {object} options
 * @param {HTMLElement} options.toastRegion
 * @param {Badges} options.badges
 * @param {(request: object) => void} options.onView  the toast's View button
 * @param {(receipt: object) => void} options.onReceipt
 */
export function createAlerter({ toastRegion, badges, onView, onReceipt }) {
  const tierRunners = {
    toast: (request) => showToast(toastRegion, request, onView),
    sound: () => playBeep(),
    notification: (request) => showNotification(request),
    title: () => badges.title(),
    favicon: () => badges.favicon(),
  };

  /**
   * Alert for one request. `flags` is {key: enabled}; `event` the realtime event that
   * brought it ({event_id, commit_timestamp}), or null when it came from a fetch.
   * Resolves with the receipt (sent to onReceipt unless sendReceipt is false).
   */
  async function alert(request, flags, event, { sendReceipt = true } = {}) {
    const runners = tierRunners;
    const master = flags[MASTER_FLAG] === true;
    const tiers = {};
    const enabled = (tier) => master && (tier === 'toast' || flags[TIER_FLAGS[tier]] === true);
    // The toast first, on its own: it is the tier that must always show.
    tiers.toast = enabled('toast')
      ? await runTier('toast', () => runners.toast(request))
      : { status: 'disabled', error: `${MASTER_FLAG} is off` };
    const shownAt = Date.now();
    const rest = TIERS.filter((t) => t !== 'toast');
    const results = await Promise.all(rest.map((tier) => (enabled(tier)
      ? runTier(tier, () => runners[tier](request))
      : Promise.resolve({
        status: 'disabled',
        error: master ? `${TIER_FLAGS[tier]} is off` : `${MASTER_FLAG} is off`,
      }))));
    rest.forEach((tier, i) => { tiers[tier] = results[i]; });
    const committed = event && event.commit_timestamp ? Date.parse(event.commit_timestamp) : NaN;
    const receipt = {
      assignment_id: request.id,
      event_id: event && typeof event.event_id === 'number' ? event.event_id : null,
      tiers,
      commit_to_shown_ms: Number.isNaN(committed) ? null : Math.max(0, shownAt - committed),
    };
    if (sendReceipt) {
      try {
        onReceipt(receipt);
      } catch (error) {
        console.error('receipt handler failed', error);
      }
    }
    return receipt;
  }

  return { alert };
}

/** Ask for notification permission (only ever from a click). Returns the permission. */
export async function askNotificationPermission() {
  if (!('Notification' in window)) return 'unsupported';
  if (Notification.permission !== 'default') return Notification.permission;
  return Notification.requestPermission();
}
