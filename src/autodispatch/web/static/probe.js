// The realtime probe: sign in as anyone, subscribe to every realtime table, trigger a
// harmless change only you can see (a probe ping), and list every event with its
// commit-to-received latency. The page the first version's team had to write by hand.

import { request } from './api.js';
import { h, $, show, setStatus } from './dom.js';
import { setupSession, openSocket } from './shell.js';

const TABLES = ['sessions', 'session_assignments', 'feature_flags', 'session_messages', 'probe_pings'];
const MAX_ROWS = 500;
const MAX_LOG = 200;

setupSession({
  namespace: 'probe',
  roles: ['customer', 'mechanic', 'admin'],
  pageName: 'Realtime probe · autodispatch',
  onSignedIn: (auth) => start(auth).catch((error) => {
    console.error(error);
    setStatus($('#ping-status'), `The probe failed to start: ${error.message}`, 'error');
  }),
});

function rowLabel(data) {
  const row = (data.type === 'DELETE' ? data.old_record : data.record) || {};
  if (data.table === 'feature_flags') return `${row.key} = ${row.enabled}`;
  if (data.table === 'probe_pings') return `nonce ${row.nonce}`;
  const id = row.id ? String(row.id).slice(0, 8) : '?';
  return row.status ? `${id}… ${row.status}` : `${id}…`;
}

async function start(auth) {
  show($('#probe'));
  $('#whoami').textContent = `Signed in as ${auth.user.email} (${auth.accountType}); you receive exactly the rows this account may read.`;
  $('#explain-hint').textContent = `autodispatch explain-delivery --event ID --user ${auth.user.email}`;
  $('#tables').textContent = TABLES.join(', ');
  const sent = new Map(); // nonce -> time the button was pressed
  let count = 0;

  function log(entry) {
    const list = $('#log');
    list.prepend(h('li', {}, `${new Date().toLocaleTimeString()} ${entry.topic ? `[${entry.topic}] ` : ''}${entry.kind}: ${entry.message}`));
    while (list.children.length > MAX_LOG) list.lastChild.remove();
  }

  function onChange(data) {
    const received = Date.now();
    const committed = Date.parse(data.commit_timestamp);
    const latency = Number.isNaN(committed) ? null : received - committed;
    const row = data.record || {};
    let note = '';
    if (data.table === 'probe_pings' && sent.has(row.nonce)) {
      const roundTrip = received - sent.get(row.nonce);
      sent.delete(row.nonce);
      note = ` (your test change: ${roundTrip} ms from the click)`;
      setStatus($('#ping-status'), `Your test change arrived: event ${data.event_id}, ${latency} ms after its commit, ${roundTrip} ms after the click.`, 'ok');
    }
    count += 1;
    $('#event-count').textContent = String(count);
    const tr = h('tr', { dataset: { eventId: data.event_id, table: data.table } },
      h('td', {}, new Date(received).toLocaleTimeString()),
      h('td', { class: 'num' }, String(data.event_id ?? '')),
      h('td', {}, data.table),
      h('td', {}, data.type),
      h('td', { class: 'mono' }, rowLabel(data) + note),
      h('td', { class: 'num latency' }, latency === null ? '–' : `${latency} ms`));
    const body = $('#events');
    body.prepend(tr);
    while (body.children.length > MAX_ROWS) body.lastChild.remove();
  }

  const socket = await openSocket(auth, { log });
  const channel = socket.channel(`probe:${auth.user.id}`, {
    changes: TABLES.map((table) => ({ event: '*', schema: 'public', table })),
    onChange,
    onCursor: (cursor) => { $('#cursor').textContent = String(cursor); },
    onResync: () => log({ kind: 'resync', message: 'the cursor was too old: subscribed afresh' }),
    onStatus: (status, detail) => log({ kind: 'channel', message: detail ? `${status}: ${detail}` : status }),
    onTokenRejected: () => auth.refresh(),
  });
  socket.connect();

  $('#ping').addEventListener('click', async (event) => {
    const button = event.currentTarget;
    const nonce = `probe-${Math.random().toString(36).slice(2, 10)}`;
    sent.set(nonce, Date.now());
    button.disabled = true;
    try {
      const body = await request('/api/probe/ping', { method: 'POST', auth, body: { nonce } });
      if (sent.has(nonce)) setStatus($('#ping-status'), `Test change written (ping ${body.ping.id}); waiting for its event…`);
      setTimeout(() => {
        if (sent.has(nonce)) {
          setStatus($('#ping-status'), `The test change (nonce ${nonce}) has not arrived after 5 s. Check the connection log, then ask the server why with the command below.`, 'error');
        }
      }, 5000);
    } catch (error) {
      sent.delete(nonce);
      setStatus($('#ping-status'), `The test change was not written: ${error.message}`, 'error');
    } finally {
      button.disabled = false;
    }
  });
  $('#reconnect').addEventListener('click', () => {
    log({ kind: 'socket', message: `reconnecting; resuming after event ${channel.cursor ?? 'none'}` });
    socket.reconnectNow();
  });
  $('#clear').addEventListener('click', () => {
    $('#events').replaceChildren();
    count = 0;
    $('#event-count').textContent = '0';
  });
}
