// Trend charts, drawn by uPlot (vendored, loaded as a classic script: the global `uPlot`).

import { el, fill, int } from './ui.js';

const COLORS = ['#2f6fed', '#d9480f', '#2b8a3e', '#7048e8'];

/** Bucket rows ({t, requests, …}) → uPlot's columns: [[t…], [series1…], …]. */
export function columns(buckets, fields) {
  const rows = [...buckets].sort((a, b) => a.t - b.t);
  return [rows.map((b) => b.t), ...fields.map((f) => rows.map((b) => Number(b[f] ?? 0)))];
}

/**
 * Draw (or redraw) a chart into `box`: `series` is [{field, label}], `buckets` the API's rows.
 * An empty range shows a sentence instead of an empty frame.
 */
export function drawChart(box, buckets, series, emptyText) {
  if (box._plot) { box._plot.destroy(); box._plot = null; }
  // The store answers every bucket of the range, zeros included: no call at all is "empty".
  if (!buckets.some((b) => series.some((s) => Number(b[s.field]) > 0))) {
    fill(box, el('p', { class: 'empty-chart' }, emptyText));
    return;
  }
  fill(box);
  if (typeof window.uPlot !== 'function') {
    fill(box, el('p', { class: 'empty-chart' }, 'The chart library did not load.'));
    return;
  }
  const width = Math.max(260, box.clientWidth || box.parentElement.clientWidth - 24);
  const opts = {
    width,
    height: 200,
    cursor: { drag: { x: false, y: false } },
    scales: { x: { time: true } },
    axes: [{}, { values: (_u, ticks) => ticks.map((v) => compact(v)), size: 56 },
      // a series with its own `scale` (quota beside requests) gets an axis on the right
      ...[...new Set(series.filter((s) => s.scale).map((s) => s.scale))].map((scale) => ({
        scale, side: 1, grid: { show: false }, values: (_u, ticks) => ticks.map((v) => compact(v)), size: 56 }))],
    series: [{}, ...series.map((s, i) => ({
      label: s.label,
      scale: s.scale || 'y',
      stroke: COLORS[i % COLORS.length],
      fill: i === 0 ? 'rgba(47,111,237,0.08)' : undefined,
      width: 2,
      points: { show: buckets.length < 3 },
      value: (_u, v) => (v === null || v === undefined ? '—' : int(v)),
    }))],
  };
  box._plot = new window.uPlot(opts, columns(buckets, series.map((s) => s.field)), box);
  box.dataset.points = String(buckets.length);
}

function compact(v) {
  const a = Math.abs(v);
  if (a >= 1e9) return `${+(v / 1e9).toFixed(1)}G`;
  if (a >= 1e6) return `${+(v / 1e6).toFixed(1)}M`;
  if (a >= 1e3) return `${+(v / 1e3).toFixed(1)}k`;
  return String(+v.toFixed(2));
}

/** Keep charts as wide as their boxes. */
export function resizeWith(boxes) {
  let t = null;
  window.addEventListener('resize', () => {
    clearTimeout(t);
    t = setTimeout(() => {
      for (const b of boxes()) {
        if (b && b._plot) b._plot.setSize({ width: Math.max(260, b.clientWidth), height: 200 });
      }
    }, 150);
  });
}
