// The key holder's page at /usage: paste a key, see remaining quota, expiry, limits, the last
// calls and a 7-day chart. The key stays in this module's memory and goes only into the
// Authorization header of same-origin requests (never a URL, never storage).

import { errorMessage } from './api.js';
import { $, el, fill, int, usd, when, emptyRow, formError } from './ui.js';
import { drawChart } from './chart.js';

window.kgCspViolations = [];
document.addEventListener('securitypolicyviolation', (e) => {
  window.kgCspViolations.push(`${e.violatedDirective} ${e.blockedURI}`);
});

let key = null;
/** Units per USD; the detail answer may carry the gateway's own. */
let QPU = 500000;

async function get(path) {
  const resp = await fetch(path, {
    headers: { Authorization: `Bearer ${key}`, Accept: 'application/json' },
    credentials: 'omit',
    cache: 'no-store',
  });
  const text = await resp.text();
  let data = text;
  try { data = JSON.parse(text); } catch { /* not JSON */ }
  if (!resp.ok) {
    const err = new Error(errorMessage(resp.status, data));
    err.status = resp.status;
    throw err;
  }
  return data;
}

async function show(ev) {
  ev.preventDefault();
  const f = $('#holder-form');
  formError(f, null);
  key = $('#holder-key').value.trim();
  const go = $('#holder-go');
  go.disabled = true;
  fill(go, 'Loading…');
  try {
    const usage = await get('/api/usage/token/');
    $('#holder-key').value = '';
    await loadDetail(); // first: it may carry quota_per_unit for the USD figures
    render(usage.data || usage);
    $('#holder-signin').hidden = true;
    $('#holder-view').hidden = false;
    $('#forget').hidden = false;
    loadChart();
    loadLog();
  } catch (err) {
    key = null;
    formError(f, err.status === 401 ? `This key is not accepted: ${err.message}` : err.message);
  } finally {
    go.disabled = false;
    fill(go, 'Show usage');
  }
}

function render(u) {
  fill($('#holder-name'), u.name || 'Your key');
  const exhausted = !u.unlimited_quota && Number(u.total_available) <= 0;
  const expired = u.expires_at > 0 && u.expires_at * 1000 < Date.now();
  const state = expired ? 'expired' : exhausted ? 'exhausted' : 'enabled';
  const badge = $('#holder-state');
  badge.className = `badge ${state}`;
  fill(badge, state);
  fill($('#holder-remaining'), u.unlimited_quota ? 'Unlimited' : `${int(u.total_available)} units`);
  fill($('#holder-remaining-usd'), u.unlimited_quota ? '' : usd(u.total_available, QPU));
  fill($('#holder-used'), `${int(u.total_used)} units`);
  fill($('#holder-used-usd'), usd(u.total_used, QPU));
  fill($('#holder-granted'), u.unlimited_quota ? 'Unlimited' : `${int(u.total_granted)} units`);
  fill($('#holder-expires'), when(u.expires_at));
  const models = u.model_limits_enabled ? Object.keys(u.model_limits || {}) : [];
  fill($('#holder-models'), u.model_limits_enabled ? (models.join(', ') || 'none') : 'All models of your group');
}

async function loadDetail() {
  const box = $('#holder-limits');
  fill(box, el('li', { class: 'muted' }, 'Loading…'));
  try {
    const d = await get('/api/usage/token/detail');
    const data = d.data || d;
    if (data.quota_per_unit) QPU = data.quota_per_unit;
    const items = [];
    const limits = data.limits || data.key?.limits || {};
    for (const [name, l] of Object.entries(limits)) {
      if (!l || typeof l !== 'object') continue;
      items.push(el('li', {}, el('strong', {}, name), ` ${int(l.remaining)} of ${int(l.limit)} left`,
        l.reset_seconds ? el('span', { class: 'muted' }, ` · full again in ${l.reset_seconds}s`) : null));
    }
    const b = data.budget || data.key?.budget;
    if (b && b.amount !== undefined) {
      items.push(el('li', {}, el('strong', {}, `${b.period || ''} budget`),
        ` ${int(b.spent)} of ${int(b.amount)} units spent`,
        b.resets_at ? el('span', { class: 'muted' }, ` · resets ${when(b.resets_at)}`) : null));
    }
    fill(box, items.length ? items : el('li', { class: 'muted' }, 'No rate limits or budget on this key.'));
  } catch (err) {
    fill(box, el('li', { class: 'muted' }, `Limits unavailable: ${err.message}`));
  }
}

async function loadChart() {
  const box = $('#holder-chart');
  fill(box, el('p', { class: 'empty-chart' }, 'Loading…'));
  try {
    const d = await get('/api/usage/token/stats?bucket=day&days=7');
    const buckets = d.buckets || d.data?.buckets || (Array.isArray(d.data) ? d.data : []);
    drawChart(box, buckets, [{ field: 'requests', label: 'Requests' }, { field: 'quota', label: 'Quota (units)', scale: 'quota' }],
      'No calls in the last 7 days. Calls you make with this key appear here.');
  } catch (err) {
    drawChart(box, [], [], `The chart is unavailable: ${err.message}`);
  }
}

async function loadLog() {
  const body = $('#holder-log-body');
  fill(body, emptyRow(8, 'Loading…'));
  try {
    const d = await get('/api/log/token');
    const rows = Array.isArray(d.data) ? d.data : d.items || [];
    fill(body, rows.length ? rows.map((r) => el('tr', {},
      el('td', { class: 'nowrap' }, when(r.created_at)),
      el('td', {}, r.model_name || r.model || ''),
      el('td', { class: 'num' }, int(r.prompt_tokens)),
      el('td', { class: 'num' }, int(r.completion_tokens)),
      el('td', { class: 'num' }, int(r.quota)),
      el('td', { class: 'num' }, r.use_time === undefined ? '—' : `${r.use_time} s`),
      el('td', {}, r.is_stream ? 'yes' : 'no'),
      el('td', {}, el('code', { class: 'small' }, r.request_id || '')))) :
      emptyRow(8, 'No calls yet. Calls you make with this key are listed here.'));
  } catch (err) {
    fill(body, emptyRow(8, `The call list is unavailable: ${err.message}`));
  }
}

$('#holder-form').addEventListener('submit', show);
$('#forget').addEventListener('click', () => { key = null; location.reload(); });
