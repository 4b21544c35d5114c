// The New key / Edit key dialog, and the dialog that shows a new secret once.

import { api, session } from './api.js';
import { $, el, fill, formError, list, usd, copyText, notify } from './ui.js';

const dialog = () => $('#key-dialog');
const form = () => $('#key-form');
let editing = null; // the key being edited, or null for a new one
let saved = () => {};

/** Open the dialog for a new key (`key` null) or to edit `key`; `onSaved` runs after a save. */
export function openKeyDialog(key, onSaved) {
  editing = key;
  saved = onSaved || (() => {});
  const f = form();
  f.reset();
  formError(f, null);
  fill($('#key-dialog-title'), key ? `Edit key “${key.name}”` : 'New key');
  fill($('#key-save'), key ? 'Save changes' : 'Create key');
  if (key) fillForm(f, key);
  showUsd();
  dialog().showModal();
  f.elements.name.focus();
}

function fillForm(f, k) {
  const e = f.elements;
  e.name.value = k.name || '';
  e.quota.value = k.quota ?? 0;
  e.unlimited_quota.checked = !!k.unlimited_quota;
  const never = !k.expires_at || k.expires_at <= 0;
  e.never_expires.checked = never;
  e.expires_at.value = never ? '' : localInput(k.expires_at);
  e.models.value = Array.isArray(k.models) ? k.models.join(', ') : '';
  e.allow_ips.value = (k.allow_ips || []).join('\n');
  e.group.value = k.group || '';
  e.account.value = k.account || '';
  const l = k.limits || {};
  e.rpm.value = l.rpm ?? '';
  e.tpm.value = l.tpm ?? '';
  e.concurrency.value = l.concurrency ?? '';
  const b = k.budget || {};
  e.budget_period.value = b.period || '';
  e.budget_amount.value = b.amount ?? '';
  e.budget_timezone.value = b.timezone || '';
}

function localInput(secs) {
  const d = new Date(secs * 1000);
  d.setMinutes(d.getMinutes() - d.getTimezoneOffset());
  return d.toISOString().slice(0, 16);
}

const num = (v) => (v === '' || v === null || v === undefined ? null : Number(v));

/** The form as the API's key fields (SPEC §1 and §7). Cleared fields are sent as null on edit. */
export function keyPayload(f, isEdit) {
  const e = f.elements;
  const p = { name: e.name.value.trim() };
  p.unlimited_quota = e.unlimited_quota.checked;
  p.quota = num(e.quota.value) ?? 0;
  if (e.never_expires.checked || !e.expires_at.value) p.expires_at = -1;
  else p.expires_at = Math.floor(new Date(e.expires_at.value).getTime() / 1000);
  const models = list(e.models.value);
  // absent/null = no restriction; the form cannot mean "nothing allowed" by leaving it empty
  p.models = models.length ? models : null;
  p.allow_ips = list(e.allow_ips.value);
  const group = e.group.value.trim();
  if (group) p.group = group;
  const account = e.account.value.trim();
  p.account = account || null;
  const limits = {};
  for (const k of ['rpm', 'tpm', 'concurrency']) {
    const v = num(e[k].value);
    if (v !== null) limits[k] = v;
  }
  p.limits = Object.keys(limits).length ? limits : null;
  const period = e.budget_period.value;
  if (period) {
    p.budget = { period, amount: num(e.budget_amount.value) ?? 0 };
    const tz = e.budget_timezone.value.trim();
    if (tz) p.budget.timezone = tz;
  } else {
    p.budget = null;
  }
  if (!isEdit) for (const k of Object.keys(p)) if (p[k] === null) delete p[k];
  return p;
}

function showUsd() {
  const e = form().elements;
  const q = num(e.quota.value);
  fill($('#quota-usd'), e.unlimited_quota.checked ? 'no cap' : q === null ? '' : `= ${usd(q, session.quotaPerUnit)}`);
  e.quota.disabled = e.unlimited_quota.checked;
  e.expires_at.disabled = e.never_expires.checked;
}

async function submit(ev) {
  ev.preventDefault();
  const f = form();
  const save = $('#key-save');
  save.disabled = true;
  save.classList.add('busy');
  formError(f, null);
  try {
    if (editing) {
      await api('PATCH', `/admin/v1/keys/${editing.id}`, keyPayload(f, true));
      dialog().close();
      notify(`Saved “${f.elements.name.value.trim()}”.`);
    } else {
      const created = await api('POST', '/admin/v1/keys', keyPayload(f, false));
      dialog().close();
      showSecrets(created, 'Your new key');
    }
    saved();
  } catch (err) {
    formError(f, err);
  } finally {
    save.disabled = false;
    save.classList.remove('busy');
  }
}

/** Show the secret(s) of a create or rotate answer once, with copy buttons. */
export function showSecrets(answer, title) {
  const keys = Array.isArray(answer?.items) ? answer.items : Array.isArray(answer) ? answer : [answer];
  const box = $('#secret-list');
  fill($('#secret-title'), title);
  fill(box, keys.filter((k) => k && k.secret).map((k) => {
    const code = el('code', { class: 'secret' }, k.secret);
    const btn = el('button', { type: 'button', class: 'ghost small copy' }, 'Copy');
    btn.addEventListener('click', async () => {
      const ok = await copyText(code.textContent, code);
      fill(btn, ok ? 'Copied' : 'Selected — press Ctrl+C');
    });
    return el('div', { class: 'secret-row' },
      el('span', { class: 'muted' }, k.name ?? `key ${k.id}`), code, btn);
  }));
  $('#secret-dialog').showModal();
}

/** Wire the dialogs once. The shown-once key leaves the DOM when its dialog closes. */
export function initKeyForm() {
  const f = form();
  f.addEventListener('submit', submit);
  f.addEventListener('input', showUsd);
  $('#key-cancel').addEventListener('click', () => dialog().close());
  const secret = $('#secret-dialog');
  $('#secret-done').addEventListener('click', () => secret.close());
  secret.addEventListener('close', () => fill($('#secret-list')));
}
