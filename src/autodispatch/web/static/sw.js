// The mechanics' service worker (served at /mechanic-sw.js, scope /mechanic).
//
// A push carries JSON: {request_summary, assignment_id, event_id, ...}. The worker shows
// a notification for it unless a visible mechanic page is open (that page alerts by
// itself, with every tier). The tag is the one the page uses, so a request never shows
// two notifications. A click focuses an open mechanic page or opens /mechanic.

self.addEventListener('install', () => {
  self.skipWaiting();
});

self.addEventListener('activate', (event) => {
  event.waitUntil(self.clients.claim());
});

function mechanicPages() {
  return self.clients.matchAll({ type: 'window', includeUncontrolled: true })
    .then((list) => list.filter((client) => new URL(client.url).pathname.startsWith('/mechanic')));
}

function describe(summary) {
  const s = summary || {};
  return [s.customer_first_name, s.vehicle].filter(Boolean).join(' · ');
}

self.addEventListener('push', (event) => {
  let payload = {};
  try {
    payload = event.data ? event.data.json() : {};
  } catch {
    payload = { request_summary: { concern: event.data ? event.data.text() : '' } };
  }
  event.waitUntil((async () => {
    const pages = await mechanicPages();
    if (pages.some((client) => client.visibilityState === 'visible')) return;
    const summary = payload.request_summary || {};
    await self.registration.showNotification(payload.title || 'New session request', {
      body: [describe(summary), summary.concern].filter(Boolean).join('\n') || 'A customer is waiting for a mechanic.',
      tag: payload.assignment_id ? `request-${payload.assignment_id}` : undefined,
      data: { url: '/mechanic', assignment_id: payload.assignment_id, event_id: payload.event_id },
      icon: '/static/favicon.svg',
    });
  })());
});

self.addEventListener('notificationclick', (event) => {
  event.notification.close();
  event.waitUntil((async () => {
    const pages = await mechanicPages();
    for (const client of pages) {
      if ('focus' in client) return client.focus();
    }
    return self.clients.openWindow('/mechanic');
  })());
});
