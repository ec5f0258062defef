// The mechanic page's notification controls: the permission line (#notification-status),
// the service worker, "Enable notifications" (permission, then a push subscription for
// when the page is closed) and "Try the alert". The status line also says when the
// alert settings could not be loaded, and goes back to the permission once they are.

import { $, setStatus } from './dom.js';
import { askNotificationPermission } from './alerts.js';
import { registerServiceWorker, subscribeToPush } from './push.js';

const FLAGS_FAILED = 'Could not load the alert settings';

function describePermission() {
  if (!('Notification' in window)) return 'This browser cannot show notifications.';
  return {
    granted: 'System notifications are on in this browser.',
    denied: 'Notifications are blocked for this site: allow them in the browser\'s site settings.',
    default: 'System notifications are off until you enable them.',
  }[Notification.permission];
}

/**
 * @param {object} options
 * @param {object} options.auth
 * @param {object} options.alerter     from alerts.js createAlerter
 * @param {{current: object|null}} options.flags
 */
export function createNotificationControls({ auth, alerter, flags }) {
  const notificationButton = $('#enable-notifications');
  const notificationStatus = $('#notification-status');
  setStatus(notificationStatus, describePermission());
  registerServiceWorker().catch((error) => console.warn('service worker not registered', error));
  notificationButton.addEventListener('click', async () => {
    notificationButton.disabled = true;
    try {
      const permission = await askNotificationPermission();
      if (permission !== 'granted') {
        setStatus(notificationStatus, describePermission(), permission === 'denied' ? 'error' : 'info');
        return;
      }
      setStatus(notificationStatus, 'Notifications are on. Setting up alerts for when this page is closed…');
      const outcome = await subscribeToPush(auth);
      setStatus(notificationStatus, outcome.ok
        ? 'Notifications are on, also when this page is closed.'
        : `Notifications are on while this page is open. Closed-page alerts are unavailable: ${outcome.reason}`,
      outcome.ok ? 'ok' : 'info');
    } finally {
      notificationButton.disabled = false;
    }
  });

  $('#try-alert').addEventListener('click', async () => {
    const sample = {
      id: 'sample', status: 'queued',
      request_summary: { customer_first_name: 'Sample', vehicle: '2020 Demo Car', concern: 'This is how an alert looks and sounds.', session_type: 'free' },
    };
    const receipt = await alerter.alert(sample, flags.current || {}, null, { sendReceipt: false });
    const worked = Object.entries(receipt.tiers).map(([tier, r]) => `${tier}: ${r.status}${r.error ? ` (${r.error})` : ''}`);
    setStatus(notificationStatus, `Alert tried. ${worked.join('; ')}`);
  });

  return {
    /** The alert settings loaded: a line saying they could not be goes. */
    flagsLoaded() {
      if ($('#notification-status').textContent.startsWith(FLAGS_FAILED)) {
        setStatus($('#notification-status'), describePermission());
      }
    },
    flagsFailed(error) {
      setStatus($('#notification-status'), `${FLAGS_FAILED} (${error.message}); retrying.`, 'error');
    },
  };
}
