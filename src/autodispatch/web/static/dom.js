// Small DOM helpers shared by the pages. Text always goes in as text (never as HTML).

/** h('button', {class: 'x', onclick: fn, 'aria-label': '...'}, 'text', child, ...) */
export function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith('on') && typeof value === 'function') {
      element.addEventListener(name.slice(2), value);
    } else if (name === 'dataset') {
      Object.assign(element.dataset, value);
    } else if (value === true) {
      element.setAttribute(name, '');
    } else {
      element.setAttribute(name, String(value));
    }
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

export function $(selector, root = document) {
  return root.querySelector(selector);
}

export function show(element, visible = true) {
  element.hidden = !visible;
}

/** "2 min", "45 s", "1 h 5 min" */
export function formatAge(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min`;
  const hours = Math.floor(m / 60);
  return `${hours} h ${m % 60} min`;
}

export function ageSince(timestamp, now = Date.now()) {
  const at = Date.parse(timestamp);
  return Number.isNaN(at) ? 0 : (now - at) / 1000;
}

export function formatTime(timestamp) {
  const at = new Date(timestamp);
  return Number.isNaN(at.getTime()) ? '' : at.toLocaleTimeString();
}

/** "Dana · 2016 Toyota Corolla" from an assignment's request_summary. */
export function describeRequest(summary) {
  const s = summary || {};
  return [s.customer_first_name, s.vehicle].filter(Boolean).join(' · ');
}

/** A polite live region that screen readers announce; one message at a time. */
export function announcer(region) {
  return (message) => {
    // Clearing first makes a repeated message announced again.
    region.textContent = '';
    setTimeout(() => {
      region.textContent = message;
    }, 50);
  };
}

/** Show a status line (role=status) with a kind: info | ok | error. */
export function setStatus(element, message, kind = 'info') {
  // Rewriting the same text would make screen readers announce it again.
  if (element.textContent !== (message || '')) element.textContent = message || '';
  element.dataset.kind = kind;
  element.hidden = !message;
}

/** Run an async click handler with the button disabled meanwhile. */
export function busy(button, fn) {
  return async (...args) => {
    if (button.disabled) return;
    button.disabled = true;
    button.setAttribute('aria-busy', 'true');
    try {
      await fn(...args);
    } finally {
      button.disabled = false;
      button.removeAttribute('aria-busy');
    }
  };
}
