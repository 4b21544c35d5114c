// The Accounts page (admin role without an account scope): list, create, edit, enable/disable,
// delete.

import { api, items, session } from './api.js';
import { $, el, fill, int, usd, notify, confirmDialog, emptyRow, loadingRow, formError } from './ui.js';

const COLS = 8;
let editing = null;
export let accountIds = [];

export function initAccounts() {
  const f = $('#account-form');
  $('#new-account')?.addEventListener('click', () => openAccount(null));
  $('#account-cancel').addEventListener('click', () => $('#account-dialog').close());
  f.addEventListener('submit', save);
}

export async function loadAccounts() {
  const body = $('#accounts-body');
  fill(body, loadingRow(COLS));
  try {
    const list = items(await api('GET', '/admin/v1/accounts'));
    accountIds = list.map((a) => a.id);
    fill($('#account-list'), accountIds.map((id) => el('option', { value: id })));
    fill(body, list.length ? list.map(row)
      : emptyRow(COLS, 'No accounts yet. Press "New account" to group keys under one quota, budget and limits.'));
  } catch (err) {
    fill(body, emptyRow(COLS, `Could not load accounts: ${err.message}`));
  }
}

/** Fill the account suggestions of the key form (quietly: an account token may not list them). */
export async function loadAccountChoices() {
  if (!session.isFullAdmin) return;
  try {
    accountIds = items(await api('GET', '/admin/v1/accounts')).map((a) => a.id);
    fill($('#account-list'), accountIds.map((id) => el('option', { value: id })));
  } catch { /* the field stays free text */ }
}

function limitsText(l) {
  if (!l) return 'none';
  const parts = [];
  if (l.rpm) parts.push(`${int(l.rpm)} rpm`);
  if (l.tpm) parts.push(`${int(l.tpm)} tpm`);
  if (l.concurrency) parts.push(`${int(l.concurrency)} at once`);
  return parts.join(' · ') || 'none';
}

function budgetText(b, status) {
  if (!b || !b.period) return 'none';
  const spent = status && status.spent !== undefined ? `${int(status.spent)} of ` : '';
  return `${spent}${int(b.amount)} units ${b.period}${b.timezone ? ` (${b.timezone})` : ''}`;
}

function row(a) {
  const state = a.state || a.status || 'enabled';
  const used = Number(a.used ?? 0);
  const remaining = a.remaining ?? (a.unlimited_quota ? null : Number(a.quota ?? 0) - used);
  const btn = (action, label, fn, cls = 'ghost small') =>
    el('button', { type: 'button', class: cls, dataset: { action }, onclick: () => fn(a) }, label);
  return el('tr', { dataset: { accountId: a.id } },
    el('td', {}, el('code', {}, a.id)),
    el('td', {}, a.name || ''),
    el('td', {}, el('span', { class: `badge ${state}` }, state)),
    el('td', {}, a.unlimited_quota ? `${int(used)} used · unlimited`
      : `${int(used)} used · ${int(remaining)} left (${usd(remaining, session.quotaPerUnit)})`),
    el('td', {}, limitsText(a.limits)),
    el('td', {}, budgetText(a.budget, a.budget_status)),
    el('td', {}, `${int(a.keys ?? 0)}${a.max_keys ? ` of ${int(a.max_keys)}` : ''}`),
    el('td', { class: 'row-actions' }, session.canWrite ? el('div', { class: 'actions-inline' },
      btn('usage', 'Usage', () => { location.hash = `#usage?account=${encodeURIComponent(a.id)}`; }),
      btn('edit', 'Edit', openAccount),
      state === 'disabled' ? btn('enable', 'Enable', (x) => setStatus(x, 'enabled'))
        : btn('disable', 'Disable', (x) => setStatus(x, 'disabled')),
      btn('delete', 'Delete', remove, 'ghost small danger')) : null),
  );
}

function openAccount(a) {
  editing = a;
  const f = $('#account-form');
  f.reset();
  formError(f, null);
  const e = f.elements;
  e.id.disabled = !!a;
  fill($('#account-dialog-title'), a ? `Edit account “${a.name || a.id}”` : 'New account');
  fill($('#account-save'), a ? 'Save changes' : 'Create account');
  if (a) {
    e.id.value = a.id;
    e.name.value = a.name || '';
    e.quota.value = a.quota ?? 0;
    e.unlimited_quota.checked = !!a.unlimited_quota;
    e.max_keys.value = a.max_keys ?? '';
    const l = a.limits || {};
    e.rpm.value = l.rpm ?? '';
    e.tpm.value = l.tpm ?? '';
    e.concurrency.value = l.concurrency ?? '';
    const b = a.budget || {};
    e.budget_period.value = b.period || '';
    e.budget_amount.value = b.amount ?? '';
    e.budget_timezone.value = b.timezone || '';
  }
  $('#account-dialog').showModal();
}

const num = (v) => (v === '' ? null : Number(v));

function payload(f) {
  const e = f.elements;
  const p = {
    name: e.name.value.trim(),
    quota: num(e.quota.value) ?? 0,
    unlimited_quota: e.unlimited_quota.checked,
    max_keys: num(e.max_keys.value),
  };
  const limits = {};
  for (const k of ['rpm', 'tpm', 'concurrency']) if (num(e[k].value) !== null) limits[k] = num(e[k].value);
  p.limits = Object.keys(limits).length ? limits : null;
  p.budget = e.budget_period.value ? { period: e.budget_period.value, amount: num(e.budget_amount.value) ?? 0 } : null;
  if (p.budget && e.budget_timezone.value.trim()) p.budget.timezone = e.budget_timezone.value.trim();
  if (!editing) {
    p.id = e.id.value.trim();
    for (const k of Object.keys(p)) if (p[k] === null) delete p[k];
  }
  return p;
}

async function save(ev) {
  ev.preventDefault();
  const f = $('#account-form');
  formError(f, null);
  try {
    if (editing) await api('PATCH', `/admin/v1/accounts/${encodeURIComponent(editing.id)}`, payload(f));
    else await api('POST', '/admin/v1/accounts', payload(f));
    $('#account-dialog').close();
    notify(editing ? 'Account saved.' : 'Account created.');
    loadAccounts();
  } catch (err) {
    formError(f, err);
  }
}

async function setStatus(a, status) {
  try {
    await api('PATCH', `/admin/v1/accounts/${encodeURIComponent(a.id)}`, { status });
    loadAccounts();
  } catch (err) {
    notify(err.message, 'error');
  }
}

async function remove(a) {
  if (!await confirmDialog(`Delete account “${a.name || a.id}”?`,
    'Its keys must be moved or deleted first; the gateway refuses otherwise.')) return;
  try {
    await api('DELETE', `/admin/v1/accounts/${encodeURIComponent(a.id)}`);
    notify('Account deleted.');
    loadAccounts();
  } catch (err) {
    notify(err.message, 'error');
  }
}
