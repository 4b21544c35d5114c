// The Usage page: trend charts (requests, quota, tokens by hour or day; per key, account or
// model) and the call log with filters, paging and CSV export.

import { api, qs, items, download, session } from './api.js';
import { $, el, fill, int, usd, when, notify, emptyRow, loadingRow } from './ui.js';
import { drawChart, resizeWith } from './chart.js';

const LOG_PAGE = 50;
const LOG_COLS = 10;
const log = { page: 1, total: 0, filters: {} };

export function initUsage() {
  const scope = $('#usage-scope');
  scope.addEventListener('change', () => {
    $('#usage-value').hidden = !scope.value;
    if (!scope.value) loadStats();
  });
  $('#usage-value').addEventListener('change', loadStats);
  $('#usage-bucket').addEventListener('change', loadStats);
  $('#usage-range').addEventListener('change', loadStats);
  $('#usage-refresh').addEventListener('click', () => { loadStats(); loadLog(); });
  $('#log-apply').addEventListener('click', () => { log.page = 1; loadLog(); });
  for (const id of ['#log-key', '#log-account', '#log-model', '#log-status']) {
    $(id).addEventListener('keydown', (e) => { if (e.key === 'Enter') { log.page = 1; loadLog(); } });
  }
  $('#log-prev').addEventListener('click', () => { if (log.page > 1) { log.page--; loadLog(); } });
  $('#log-next').addEventListener('click', () => { if (log.page * LOG_PAGE < log.total) { log.page++; loadLog(); } });
  $('#log-export').addEventListener('click', exportCsv);
  resizeWith(() => ['#chart-requests', '#chart-quota', '#chart-tokens'].map((s) => $(s)));
}

/** Show the page; `params` (from `#usage?key_id=5`) preselects a scope. */
export function showUsage(params) {
  for (const f of ['key_id', 'account', 'model']) {
    if (params.get(f)) {
      $('#usage-scope').value = f;
      $('#usage-value').hidden = false;
      $('#usage-value').value = params.get(f);
      $(f === 'key_id' ? '#log-key' : `#log-${f}`).value = params.get(f);
    }
  }
  loadStats();
  log.page = 1;
  loadLog();
}

function scopeFilter() {
  const f = $('#usage-scope').value;
  const v = $('#usage-value').value.trim();
  return f && v ? { [f]: v } : {};
}

async function loadStats() {
  const end = Math.floor(Date.now() / 1000);
  const start = end - Number($('#usage-range').value);
  const bucket = $('#usage-bucket').value;
  const boxes = ['#chart-requests', '#chart-quota', '#chart-tokens'].map((s) => $(s));
  for (const b of boxes) if (!b._plot) fill(b, el('p', { class: 'empty-chart' }, 'Loading…'));
  try {
    const data = await api('GET', `/admin/v1/stats${qs({ ...scopeFilter(), start, end, bucket })}`);
    const buckets = data?.buckets || data?.data?.buckets || [];
    const empty = 'No calls in this range yet. Calls through the gateway show up here within seconds.';
    drawChart(boxes[0], buckets, [{ field: 'requests', label: 'Requests' }, { field: 'errors', label: 'Errors' }], empty);
    drawChart(boxes[1], buckets, [{ field: 'quota', label: 'Quota (units)' }], empty);
    drawChart(boxes[2], buckets, [
      { field: 'prompt_tokens', label: 'Prompt tokens' },
      { field: 'completion_tokens', label: 'Completion tokens' }], empty);
    const sum = (f) => buckets.reduce((a, b) => a + Number(b[f] || 0), 0);
    fill($('#usage-summary'),
      el('span', {}, el('strong', { id: 'sum-requests' }, int(sum('requests'))), ' requests'),
      el('span', {}, el('strong', {}, int(sum('errors'))), ' errors'),
      el('span', {}, el('strong', { id: 'sum-quota' }, int(sum('quota'))), ` units (${usd(sum('quota'), session.quotaPerUnit)})`),
      el('span', {}, el('strong', {}, int(sum('prompt_tokens') + sum('completion_tokens'))), ' tokens'));
  } catch (err) {
    for (const b of boxes) drawChart(b, [], [], `Could not load usage: ${err.message}`);
    fill($('#usage-summary'));
  }
}

function logFilters() {
  const f = {
    key_id: $('#log-key').value.trim(),
    account: $('#log-account').value.trim(),
    model: $('#log-model').value.trim(),
    status: $('#log-status').value.trim(),
  };
  return f;
}

async function loadLog() {
  const body = $('#log-body');
  fill(body, loadingRow(LOG_COLS));
  log.filters = logFilters();
  try {
    const data = await api('GET', `/admin/v1/logs${qs({ ...log.filters, page: log.page, page_size: LOG_PAGE })}`);
    const rows = items(data);
    log.total = data?.total ?? rows.length;
    log.capped = !!data?.total_capped;
    fill(body, rows.length ? rows.map(logRow) : emptyRow(LOG_COLS,
      Object.values(log.filters).some(Boolean)
        ? 'No calls match these filters. Clear a filter to see more.'
        : 'No calls yet. Once a key makes a call through the gateway it is listed here.'));
  } catch (err) {
    log.total = 0;
    fill(body, emptyRow(LOG_COLS, `Could not load the call log: ${err.message}`));
  }
  const pages = Math.max(1, Math.ceil(log.total / LOG_PAGE));
  fill($('#log-page'), `Page ${log.page} of ${pages} · ${int(log.total)}${log.capped ? '+' : ''} calls`);
  $('#log-prev').disabled = log.page <= 1;
  $('#log-next').disabled = log.page >= pages;
}

function logRow(r) {
  const status = r.status ?? '';
  const bad = Number(status) >= 400 || r.error_code;
  return el('tr', { class: bad ? 'error' : '' },
    el('td', { class: 'nowrap' }, when(r.created_at)),
    el('td', {}, r.key_name ?? '', el('span', { class: 'muted small' }, ` #${r.key_id ?? ''}`)),
    el('td', {}, r.account || '—'),
    el('td', {}, r.model || '—'),
    el('td', {}, el('span', { class: `badge ${bad ? 'disabled' : 'enabled'}` }, String(status)),
      r.error_code ? el('span', { class: 'muted small' }, ` ${r.error_code}`) : null),
    el('td', { class: 'num' }, int(r.prompt_tokens)),
    el('td', { class: 'num' }, int(r.completion_tokens)),
    el('td', { class: 'num' }, int(r.quota)),
    el('td', { class: 'num' }, r.duration_ms === undefined ? '—' : `${int(r.duration_ms)} ms`),
    el('td', {}, el('code', { class: 'small' }, r.request_id || '')),
  );
}

async function exportCsv() {
  const b = $('#log-export');
  b.disabled = true;
  try {
    const f = logFilters();
    await download(`/admin/v1/logs.csv${qs(f)}`, 'keygate-calls.csv');
    notify('Exported the call log as CSV.');
  } catch (err) {
    notify(`CSV export failed: ${err.message}`, 'error');
  } finally {
    b.disabled = false;
  }
}
