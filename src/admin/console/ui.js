// Small DOM helpers. Every piece of data reaches the page as text (textContent or a text node),
// never as markup: a key named <img src=x onerror=alert(1)> shows those characters.

/** Build an element: el('td', {class: 'x', onclick: fn}, 'text', child, …). */
export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') e.addEventListener(k.slice(2), v);
    else if (k === 'class') e.className = v;
    else if (k === 'dataset') Object.assign(e.dataset, v);
    else if (k in e && typeof v !== 'string') e[k] = v;
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  append(e, children);
  return e;
}

function append(e, children) {
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** Replace an element's children. */
export function fill(e, ...children) {
  e.replaceChildren();
  append(e, children);
  return e;
}

export const $ = (sel, root = document) => root.querySelector(sel);
export const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];

const intFmt = new Intl.NumberFormat('en-US');
/** 1234567 → "1,234,567". */
export const int = (n) => (n === undefined || n === null ? '—' : intFmt.format(n));

/** Quota units as "1,234 units ($0.0025)" at quota_per_unit. */
export function quota(units, perUnit) {
  if (units === undefined || units === null) return '—';
  return `${int(units)} units (${usd(units, perUnit)})`;
}

export function usd(units, perUnit) {
  const v = units / (perUnit || 500000);
  const digits = v !== 0 && Math.abs(v) < 0.01 ? 4 : 2;
  return '$' + v.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

/** Unix seconds → "2026-12-02 13:48"; -1 / 0 / null → "never". */
export function when(secs) {
  if (secs === undefined || secs === null || secs <= 0) return 'never';
  const d = new Date(secs * 1000);
  const p = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}`;
}

/** A status line: the person reads what happened, errors in the API's own words. */
export function notify(message, kind = 'ok') {
  const box = $('#toast');
  if (!box) return;
  const item = el('div', { class: `toast ${kind}`, role: kind === 'error' ? 'alert' : 'status' }, message);
  box.append(item);
  setTimeout(() => item.remove(), kind === 'error' ? 9000 : 4000);
}

/** Show an error inside a form (and keep it until the next try). */
export function formError(form, err) {
  const slot = $('.form-error', form);
  if (slot) fill(slot, err ? String(err.message || err) : '');
}

/** A confirmation dialog (never window.confirm). Resolves true when confirmed. */
export function confirmDialog(title, body, action = 'Delete') {
  return new Promise((resolve) => {
    const d = el('dialog', { class: 'confirm', 'aria-label': title });
    const done = (v) => { d.close(); d.remove(); resolve(v); };
    d.append(
      el('h2', {}, title),
      el('p', {}, body),
      el('div', { class: 'actions' },
        el('button', { type: 'button', class: 'ghost', onclick: () => done(false) }, 'Cancel'),
        el('button', { type: 'button', class: 'danger', id: 'confirm-yes', onclick: () => done(true) }, action)),
    );
    d.addEventListener('cancel', () => resolve(false));
    document.body.append(d);
    d.showModal();
  });
}

/** A row that says there is nothing yet, and what to do about it. */
export function emptyRow(cols, text) {
  return el('tr', { class: 'empty' }, el('td', { colspan: cols }, text));
}

export function loadingRow(cols) {
  return el('tr', { class: 'loading' }, el('td', { colspan: cols }, 'Loading…'));
}

/** Copy text, with a fallback for browsers without the async clipboard. */
export async function copyText(text, node) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    if (node) {
      const r = document.createRange();
      r.selectNodeContents(node);
      const s = getSelection();
      s.removeAllRanges();
      s.addRange(r);
    }
    return false;
  }
}

/** Comma or newline separated text → trimmed non-empty items. */
export const list = (text) => String(text || '').split(/[\n,]/).map((s) => s.trim()).filter(Boolean);
