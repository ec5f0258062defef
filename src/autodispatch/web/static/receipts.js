// Alert receipts: POST /api/alert-receipts after each alert, naming the event that brought
// it (or, from a queue read, only the assignment: the server finds its event). A receipt
// that cannot be sent (offline, server down) waits in localStorage and is sent later; the
// server keeps one receipt per mechanic and event, so sending one twice does not count twice.

import { request, ApiError } from './api.js';

const MAX_KEPT = 50;
const MAX_AGE_MS = 24 * 3600 * 1000;
const RETRY_MS = 30000;

export class ReceiptOutbox {
  constructor(userId, auth, storage = window.localStorage) {
    this.key = `autodispatch.receipts.${userId}`;
    this.auth = auth;
    this.storage = storage;
    this.sending = false;
    this.sent = 0;
    this.failed = 0;
    setInterval(() => this.retry(), RETRY_MS);
  }

  async send(receipt) {
    if (!(await this._post(receipt))) this._keep(receipt);
  }

  async retry() {
    if (this.sending) return;
    this.sending = true;
    try {
      const waiting = this._read();
      if (!waiting.length) return;
      const done = new Set(); // entries sent or too old, as stored
      for (const entry of waiting) {
        if (Date.now() - entry.at > MAX_AGE_MS || await this._post(entry.receipt)) {
          done.add(JSON.stringify(entry));
        }
      }
      // Read again: receipts kept while this ran (a send that failed meanwhile, another
      // tab) stay; only what was handled here goes.
      this._write(this._read().filter((entry) => !done.has(JSON.stringify(entry))));
    } finally {
      this.sending = false;
    }
  }

  /** true when the server has it (or will never take it: no point in keeping it). */
  async _post(receipt) {
    try {
      await request('/api/alert-receipts', { method: 'POST', body: receipt, auth: this.auth });
      this.sent += 1;
      return true;
    } catch (error) {
      this.failed += 1;
      const status = error instanceof ApiError ? error.status : 0;
      // A 404 from a server that has no receipts route yet is worth retrying; the server
      // saying this alert's event is not one of ours will say so again.
      const refused = error instanceof ApiError && error.code === 'alert_event_not_found';
      const worthRetrying = !refused
        && (status === 0 || status === 404 || status === 408 || status === 429 || status >= 500);
      if (!worthRetrying) console.warn('alert receipt refused', error);
      return !worthRetrying;
    }
  }

  _keep(receipt) {
    const waiting = this._read();
    waiting.push({ at: Date.now(), receipt });
    this._write(waiting.slice(-MAX_KEPT));
  }

  _read() {
    try {
      return JSON.parse(this.storage.getItem(this.key) || '[]');
    } catch {
      return [];
    }
  }

  _write(entries) {
    try {
      if (entries.length) this.storage.setItem(this.key, JSON.stringify(entries));
      else this.storage.removeItem(this.key);
    } catch {
      // storage full or blocked
    }
  }
}
