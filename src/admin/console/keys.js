// The Keys page: the table with search, state filter and paging; the row actions.

import { api, qs, items, session } from './api.js';
import { $, $$, el, fill, int, usd, when, notify, confirmDialog, emptyRow, loadingRow, formError } from './ui.js';
import { openKeyDialog, showSecrets } from './key_form.js';

const PAGE_SIZE = 20;
const COLS = 11;
const view = { page: 1, total: 0, q: '', state: '', rows: [] };
let searchTimer = null;

export function initKeys() {
  $('#key-search').addEventListener('input', (e) => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => { view.q = e.target.value.trim(); view.page = 1; loadKeys(); }, 250);
  });
  $('#key-state').addEventListener('change', (e) => { view.state = e.target.value; view.page = 1; loadKeys(); });
  $('#keys-prev').addEventListener('click', () => { if (view.page > 1) { view.page--; loadKeys(); } });
  $('#keys-next').addEventListener('click', () => {
    if (view.page * PAGE_SIZE < view.total) { view.page++; loadKeys(); }
  });
  $('#new-key')?.addEventListener('click', () => openKeyDialog(null, loadKeys));
  $('#batch-delete')?.addEventListener('click', batchDelete);
  $('#select-all')?.addEventListener('change', (e) => {
    for (const c of $$('#keys-body input.pick')) c.checked = e.target.checked;
    selectionChanged();
  });
  $('#reveal-cancel').addEventListener('click', () => $('#reveal-dialog').close());
}

/** Load the current page of keys and draw it. */
export async function loadKeys() {
  const body = $('#keys-body');
  if (!view.rows.length) fill(body, loadingRow(COLS));
  body.setAttribute('aria-busy', 'true');
  try {
    const data = await api('GET', `/admin/v1/keys${qs({ page: view.page, page_size: PAGE_SIZE, q: view.q, state: view.state })}`);
    if (data && data.quota_per_unit) session.quotaPerUnit = data.quota_per_unit;
    view.rows = items(data);
    view.total = data?.total ?? view.rows.length;
    draw();
  } catch (err) {
    fill(body, emptyRow(COLS, `Could not load keys: ${err.message}`));
  } finally {
    body.removeAttribute('aria-busy');
  }
}

function draw() {
  const body = $('#keys-body');
  if (!view.rows.length) {
    const filtered = view.q || view.state;
    fill(body, emptyRow(COLS, filtered
      ? 'No key matches this search. Clear the search box or pick "All states".'
      : session.canWrite ? 'No keys yet. Press "New key" to create the first one.'
        : 'No keys yet. An admin can create them.'));
  } else {
    fill(body, view.rows.map(row));
  }
  const pages = Math.max(1, Math.ceil(view.total / PAGE_SIZE));
  fill($('#keys-page'), `Page ${view.page} of ${pages} · ${int(view.total)} keys`);
  $('#keys-prev').disabled = view.page <= 1;
  $('#keys-next').disabled = view.page >= pages;
  const all = $('#select-all');
  if (all) all.checked = false;
  selectionChanged();
}

function row(k) {
  const state = k.state || k.status || 'enabled';
  return el('tr', { dataset: { keyId: k.id } },
    session.canWrite && el('td', {}, el('input', { type: 'checkbox', class: 'pick', value: k.id,
      'aria-label': `Select ${k.name}`, onchange: selectionChanged })),
    el('td', { class: 'name' }, el('strong', {}, k.name),
      el('div', { class: 'small' }, el('a', { href: `#usage?key_id=${k.id}`, title: 'Usage of this key' }, `#${k.id} · usage`))),
    el('td', {}, el('span', { class: `badge ${state}` }, state)),
    el('td', {}, k.key_hint ? el('code', { class: 'hint' }, k.key_hint)
      : el('span', { class: 'muted small', title: 'Only the hash of this key is stored' }, 'hash only')),
    el('td', { class: 'quota' }, quotaBar(k)),
    el('td', {}, k.group || 'default'),
    el('td', {}, k.account || '—'),
    el('td', { class: 'models' }, Array.isArray(k.models) ? (k.models.length ? k.models.join(', ') : 'none allowed') : 'all'),
    el('td', { class: 'ips' }, k.allow_ips && k.allow_ips.length ? k.allow_ips.join(', ') : 'any'),
    el('td', { class: 'when' }, when(k.expires_at)),
    el('td', { class: 'row-actions' }, actions(k, state)),
  );
}

function quotaBar(k) {
  const used = Number(k.used ?? 0);
  const remaining = k.remaining;
  const qpu = session.quotaPerUnit;
  if (k.unlimited_quota) {
    return el('div', { class: 'bar-wrap' },
      el('div', { class: 'bar unlimited' }, el('span')),
      el('div', { class: 'small' }, `${int(used)} used · unlimited`));
  }
  const total = used + Math.max(0, Number(remaining ?? 0));
  const pct = total > 0 ? Math.min(100, (used / total) * 100) : 100;
  const fillEl = el('span');
  fillEl.style.width = `${pct.toFixed(1)}%`;
  const bar = el('div', { class: `bar ${pct >= 90 ? 'hot' : ''}`, role: 'progressbar',
    'aria-valuenow': Math.round(pct), 'aria-valuemin': 0, 'aria-valuemax': 100 }, fillEl);
  return el('div', { class: 'bar-wrap' }, bar,
    el('div', { class: 'small' },
      el('span', { class: 'used' }, int(used)), ' used · ',
      el('span', { class: 'remaining' }, int(remaining)), ' left',
      el('span', { class: 'muted' }, ` (${usd(Number(remaining ?? 0), qpu)})`)));
}

function actions(k, state) {
  const btn = (action, label, fn, cls = 'ghost small') =>
    el('button', { type: 'button', class: cls, dataset: { action }, onclick: () => fn(k) }, label);
  const list = [];
  if (session.canWrite) {
    list.push(btn('edit', 'Edit', (key) => openKeyDialog(key, loadKeys)));
    list.push(k.status === 'disabled' || state === 'disabled'
      ? btn('enable', 'Enable', (key) => toggle(key, 'enable'))
      : btn('disable', 'Disable', (key) => toggle(key, 'disable')));
    list.push(btn('rotate', 'Rotate', rotate));
    if (k.revealable) list.push(btn('reveal', 'View key', reveal));
    list.push(btn('delete', 'Delete', remove, 'ghost small danger'));
  }
  return el('div', { class: 'actions-inline' }, list);
}

async function toggle(k, what) {
  try {
    await api('POST', `/admin/v1/keys/${k.id}/${what}`, {});
    notify(`${what === 'enable' ? 'Enabled' : 'Disabled'} “${k.name}”.`);
    loadKeys();
  } catch (err) {
    notify(err.message, 'error');
  }
}

async function rotate(k) {
  const ok = await confirmDialog(`Rotate “${k.name}”?`,
    'A new key replaces the current one; the old key stops working. The new key is shown once.', 'Rotate');
  if (!ok) return;
  try {
    const answer = await api('POST', `/admin/v1/keys/${k.id}/rotate`, { grace_seconds: 0 });
    showSecrets({ name: k.name, ...answer }, `New key for “${k.name}”`);
    loadKeys();
  } catch (err) {
    notify(err.message, 'error');
  }
}

function reveal(k) {
  const d = $('#reveal-dialog');
  const f = $('#reveal-form');
  f.reset();
  formError(f, null);
  fill($('#reveal-title'), `View full key of “${k.name}”`);
  f.onsubmit = async (ev) => {
    ev.preventDefault();
    const token = $('#reveal-token').value;
    try {
      const answer = await api('POST', `/admin/v1/keys/${k.id}/reveal`, {}, { token });
      $('#reveal-token').value = '';
      d.close();
      showSecrets({ name: k.name, secret: answer.secret || answer.key }, `Key of “${k.name}”`);
    } catch (err) {
      formError(f, err.status === 401 ? 'That token was not accepted (401); enter your admin token.'
        : err.status === 409 ? `${err.message} — this key cannot be shown again; rotate it instead.` : err);
    }
  };
  d.addEventListener('close', () => { $('#reveal-token').value = ''; }, { once: true });
  d.showModal();
}

async function remove(k) {
  const ok = await confirmDialog(`Delete “${k.name}”?`,
    'Calls with this key will be refused at once. This cannot be undone.');
  if (!ok) return;
  try {
    await api('DELETE', `/admin/v1/keys/${k.id}`);
    notify(`Deleted “${k.name}”.`);
    loadKeys();
  } catch (err) {
    notify(err.message, 'error');
  }
}

function picked() {
  return $$('#keys-body input.pick:checked').map((c) => Number(c.value));
}

function selectionChanged() {
  const b = $('#batch-delete');
  if (!b) return;
  const n = picked().length;
  b.disabled = n === 0;
  fill(b, n ? `Delete selected (${n})` : 'Delete selected');
}

async function batchDelete() {
  const ids = picked();
  if (!ids.length) return;
  const ok = await confirmDialog(`Delete ${ids.length} key${ids.length > 1 ? 's' : ''}?`,
    'Calls with these keys will be refused at once. This cannot be undone.');
  if (!ok) return;
  try {
    await api('POST', '/admin/v1/keys/batch-delete', { ids });
    notify(`Deleted ${ids.length} key${ids.length > 1 ? 's' : ''}.`);
    loadKeys();
  } catch (err) {
    notify(err.message, 'error');
  }
}
