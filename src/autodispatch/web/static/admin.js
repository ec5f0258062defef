// The admin page: feature flags toggled live, the queue with its ages and offers to a
// chosen mechanic, mechanics online (presence), and alert delivery health.
//
// Like the mechanic's page, it subscribes first, then reads: events that arrive while the
// queue loads are applied again on top of it, and of overlapping reads (a rejoin while
// one loads) only the latest applies; the flags are read again when a flag event came
// during the read.

import { request } from './api.js';
import { h, $, show, setStatus, announcer, formatAge, describeRequest } from './dom.js';
import { setupSession, openSocket } from './shell.js';
import { QueueStore, CatchUp } from './queue-state.js';

const HEALTH_EVERY_MS = 10000;
const TIERS = ['toast', 'sound', 'notification', 'title', 'favicon'];

setupSession({
  namespace: 'admin',
  roles: ['admin'],
  pageName: 'Admin · autodispatch',
  onSignedIn: (auth) => start(auth).catch((error) => {
    console.error(error);
    setStatus($('#queue-message'), `The page failed to start: ${error.message}`, 'error');
  }),
});

async function start(auth) {
  const announce = announcer($('#announcer'));
  const store = new QueueStore();
  const queueReads = new CatchUp();
  let flagEvents = 0; // flag events seen (a read that saw this change may be older)
  let flagReads = 0; // the latest read of the flags shows; older ones do not
  const since = new Map(); // assignment id -> queued time on this clock (ms)
  let mechanics = [];
  const flagsInFlight = new Set();
  show($('#dashboard'));

  // -- flags --------------------------------------------------------------------------

  async function loadFlags() {
    const read = ++flagReads;
    try {
      for (let tries = 0; tries < 3; tries += 1) {
        const seen = flagEvents;
        const body = await request('/api/feature-flags', { auth });
        if (read !== flagReads) return; // a newer read shows
        if (seen === flagEvents) {
          renderFlags(body.items);
          setStatus($('#flags-message'), '');
          return;
        }
        // A flag event came during the read: the read may be older. Read again (after
        // three tries, the events keep the switches current on their own).
      }
    } catch (error) {
      if (read === flagReads) setStatus($('#flags-message'), `Could not load the flags: ${error.message}`, 'error');
    }
  }

  function renderFlags(items) {
    const box = $('#flag-switches');
    box.replaceChildren(...items.map((flag) => flagRow(flag)));
  }

  function flagRow(flag) {
    const id = `flag-${flag.key}`;
    const input = h('input', { id, type: 'checkbox', role: 'switch', 'aria-describedby': `${id}-description`, dataset: { flag: flag.key } });
    input.checked = flag.enabled;
    input.setAttribute('aria-checked', String(flag.enabled));
    input.addEventListener('change', () => toggle(flag.key, input));
    return h('div', { class: 'switch', dataset: { flag: flag.key } },
      h('label', { for: id }, h('code', {}, flag.key),
        h('span', { id: `${id}-description`, class: 'description' }, flag.description || '')),
      input);
  }

  async function toggle(key, input) {
    const enabled = input.checked;
    flagsInFlight.add(key);
    input.disabled = true;
    try {
      const flag = await request(`/api/feature-flags/${encodeURIComponent(key)}`, { method: 'PATCH', auth, body: { enabled } });
      input.checked = flag.enabled;
      setStatus($('#flags-message'), `${key} is now ${flag.enabled ? 'on' : 'off'}.`, 'ok');
    } catch (error) {
      input.checked = !enabled;
      setStatus($('#flags-message'), `${key} was not changed: ${error.message}`, 'error');
    } finally {
      input.setAttribute('aria-checked', String(input.checked));
      input.disabled = false;
      flagsInFlight.delete(key);
    }
  }

  function onFlagEvent(data) {
    flagEvents += 1;
    const record = data.type === 'DELETE' ? data.old_record : data.record;
    if (!record || !record.key) return;
    const input = document.querySelector(`input[data-flag="${CSS.escape(record.key)}"]`);
    if (data.type === 'DELETE') {
      if (input) input.closest('.switch').remove();
      return;
    }
    if (!input) {
      $('#flag-switches').append(flagRow(record));
      return;
    }
    if (!flagsInFlight.has(record.key)) {
      input.checked = record.enabled;
      input.setAttribute('aria-checked', String(record.enabled));
    }
  }

  // -- queue --------------------------------------------------------------------------

  async function loadQueue() {
    // Admins read the same queue as mechanics: row-level security shows them every
    // queued and offered request. Ages are counted here from queued_at, so they tick.
    const load = queueReads.begin();
    let body;
    try {
      body = await request('/api/mechanic/queue', { auth });
    } catch (error) {
      if (queueReads.finish(load) === null) return; // a newer read reports for itself
      throw error;
    }
    const events = queueReads.finish(load);
    if (events === null) return; // a newer read started: this snapshot may be older
    for (const item of body.items || []) {
      since.set(item.id, Date.parse(item.queued_at || item.created_at));
    }
    store.applySnapshot(body.items || []);
    for (const data of events) applyAssignmentEvent(data, false);
    renderQueue();
  }

  async function loadMechanics() {
    try {
      mechanics = (await request('/api/mechanics', { auth })).items || [];
      renderQueue();
    } catch (error) {
      setStatus($('#queue-message'), `Could not load the mechanics: ${error.message}`, 'error');
    }
  }

  function onAssignmentEvent(data) {
    queueReads.note(data);
    applyAssignmentEvent(data, true);
  }

  function applyAssignmentEvent(data, live) {
    const { kind, assignment } = store.applyEvent(data);
    if (kind === 'added') {
      since.set(assignment.id, Date.parse(assignment.queued_at || assignment.created_at));
      if (live) announce(`New request: ${describeRequest(assignment.request_summary)}`);
    }
    if (kind !== 'ignored') renderQueue();
  }

  const rows = new Map();

  function renderQueue() {
    const body = $('#queue-rows');
    const items = store.list();
    const ids = new Set(items.map((a) => a.id));
    for (const [id, row] of rows) {
      if (!ids.has(id)) {
        row.remove();
        rows.delete(id);
      }
    }
    items.forEach((assignment, index) => {
      const key = `${assignment.status}|${assignment.offered_to || ''}|${mechanics.length}`;
      let row = rows.get(assignment.id);
      if (!row || row.dataset.key !== key) {
        const fresh = queueRow(assignment);
        fresh.dataset.key = key;
        if (row) row.replaceWith(fresh);
        row = fresh;
        rows.set(assignment.id, row);
      }
      if (body.children[index] !== row) body.insertBefore(row, body.children[index] || null);
    });
    $('#queue-count').textContent = String(items.length);
    show($('#queue-empty'), items.length === 0);
    tick();
  }

  function queueRow(assignment) {
    const summary = assignment.request_summary || {};
    const selectId = `offer-to-${assignment.id}`;
    const ttlId = `offer-ttl-${assignment.id}`;
    const select = h('select', { id: selectId },
      h('option', { value: '' }, 'Choose a mechanic'),
      mechanics.map((m) => h('option', { value: m.id }, m.workshop_name ? `${m.display_name} (${m.workshop_name})` : m.display_name)));
    const ttl = h('input', { id: ttlId, type: 'number', min: '5', max: '86400', value: '120', inputmode: 'numeric' });
    const button = h('button', { type: 'button', class: 'secondary' }, 'Offer');
    button.addEventListener('click', () => offer(assignment, select, ttl, button));
    const offeredTo = mechanics.find((m) => m.id === assignment.offered_to);
    return h('tr', { dataset: { assignmentId: assignment.id } },
      h('td', {}, h('strong', {}, describeRequest(summary)), h('br'), h('span', { class: 'concern' }, summary.concern || '')),
      h('td', {}, assignment.status === 'offered'
        ? `offered to ${offeredTo ? offeredTo.display_name : 'a mechanic'}` : assignment.status),
      h('td', { class: 'num age', dataset: { assignmentId: assignment.id } }, ''),
      h('td', {},
        h('label', { for: selectId, class: 'visually-hidden' }, `Mechanic for ${describeRequest(summary)}`), select,
        h('label', { for: ttlId }, 'Seconds to answer'), ttl, button));
  }

  function tick() {
    const now = Date.now();
    for (const cell of document.querySelectorAll('#queue-rows td.age')) {
      const at = since.get(cell.dataset.assignmentId);
      cell.textContent = at ? formatAge((now - at) / 1000) : '';
    }
  }

  async function offer(assignment, select, ttl, button) {
    if (!select.value) {
      setStatus($('#queue-message'), 'Choose a mechanic to offer this request to.', 'error');
      select.focus();
      return;
    }
    button.disabled = true;
    try {
      await request(`/api/assignments/${assignment.id}/offer`, {
        method: 'POST', auth, body: { mechanic_id: select.value, ttl_seconds: Number(ttl.value) || 120 },
      });
      const name = select.options[select.selectedIndex].textContent;
      setStatus($('#queue-message'), `Offered to ${name} for ${Number(ttl.value) || 120} s.`, 'ok');
    } catch (error) {
      setStatus($('#queue-message'), `Not offered: ${error.message}`, 'error');
    } finally {
      button.disabled = false;
    }
  }

  // -- presence -----------------------------------------------------------------------

  function renderOnline(presence) {
    const people = presence.list().map(({ key, metas }) => ({ key, meta: metas[metas.length - 1] || {}, count: metas.length }));
    $('#online-list').replaceChildren(...people.map(({ key, meta, count }) => h('li', { dataset: { userId: key } },
      meta.name || key, count > 1 ? ` (${count} pages)` : '')));
    $('#online-count').textContent = String(people.length);
    show($('#online-empty'), people.length === 0);
  }

  // -- health -------------------------------------------------------------------------

  async function loadHealth() {
    const minutes = $('#health-window').value;
    try {
      const health = await request(`/api/admin/alert-health?minutes=${encodeURIComponent(minutes)}`, { auth });
      const tiers = health.tiers || {};
      $('#health-tiers').replaceChildren(...TIERS.map((tier) => {
        const counts = tiers[tier] || {};
        return h('tr', { dataset: { tier } }, h('th', { scope: 'row' }, tier),
          ...['shown', 'failed', 'disabled', 'unsupported'].map((s) => h('td', { class: 'num', dataset: { status: s } }, String(counts[s] || 0))));
      }));
      const l = health.latency_ms || {};
      const ms = (v) => (v === null || v === undefined ? '–' : `${Math.round(v)} ms`);
      $('#health-latency').textContent = l.count
        ? `Commit to shown, ${l.count} alerts: p50 ${ms(l.p50)}, p95 ${ms(l.p95)}, p99 ${ms(l.p99)}.`
        : 'No alert timings in this window.';
      const failures = health.recent_failures || [];
      $('#health-failures').replaceChildren(...(failures.length ? failures.map((f) => h('li', {},
        h('strong', {}, f.tier), ` · ${f.mechanic || 'a mechanic'} · ${new Date(f.at).toLocaleString()} · ${f.error || 'no reason given'}`))
        : [h('li', { class: 'empty' }, 'None.')]));
      setStatus($('#health-message'), '');
    } catch (error) {
      setStatus($('#health-message'), `Could not load delivery health: ${error.message}`, 'error');
    }
  }

  $('#health-refresh').addEventListener('click', loadHealth);
  $('#health-window').addEventListener('change', loadHealth);
  setInterval(loadHealth, HEALTH_EVERY_MS);

  // -- realtime -------------------------------------------------------------------------

  const socket = await openSocket(auth);
  socket.channel(`admin:${auth.user.id}`, {
    changes: [
      { event: '*', schema: 'public', table: 'feature_flags' },
      { event: '*', schema: 'public', table: 'session_assignments' },
    ],
    onChange: (data) => {
      if (data.table === 'feature_flags') onFlagEvent(data);
      else if (data.table === 'session_assignments') onAssignmentEvent(data);
    },
    onStatus: (status) => {
      if (status === 'subscribed') {
        Promise.all([loadFlags(), loadQueue(), loadMechanics()])
          .catch((error) => setStatus($('#queue-message'), `Could not load the queue: ${error.message}`, 'error'));
      }
    },
    onTokenRejected: () => auth.refresh(),
  });
  socket.channel('mechanics-online', { watchPresence: true, onPresence: renderOnline });
  socket.connect();
  loadHealth();
  setInterval(tick, 1000);
}
