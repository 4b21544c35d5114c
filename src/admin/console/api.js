// The admin API client. The admin token lives in this tab's sessionStorage only (never
// localStorage, never a cookie) and travels only in the Authorization header of same-origin
// requests; no secret ever goes into a URL.

const TOKEN = 'keygate.admin_token';

export const session = {
  get token() { return sessionStorage.getItem(TOKEN); },
  set token(t) { if (t) sessionStorage.setItem(TOKEN, t); else sessionStorage.removeItem(TOKEN); },
  /** Filled after sign-in from GET /admin/v1/session: name, role ("admin" | "viewer"),
   * account scope, whether there is a key vault. */
  me: { role: 'viewer', account: null, name: null, vault: false },
  quotaPerUnit: 500000,
  get canWrite() { return this.me.role !== 'viewer'; },
  get isFullAdmin() { return this.me.role !== 'viewer' && !this.me.account; },
};

/** An API refusal, with the message the API gave (a bad CIDR names the CIDR). */
export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

/** The human message in any of the error shapes the gateway writes. */
export function errorMessage(status, body, fallback) {
  if (body && typeof body === 'object') {
    const e = body.error;
    if (e && typeof e === 'object') {
      const field = e.field || e.param;
      const msg = e.message || e.code;
      if (msg) return field && !String(msg).includes(field) ? `${field}: ${msg}` : String(msg);
    }
    if (typeof e === 'string') return e;
    if (body.message) return String(body.message);
  }
  if (typeof body === 'string' && body.trim()) return body.trim().slice(0, 300);
  return fallback || `HTTP ${status}`;
}

/**
 * Call the API. `opts.token` overrides the session token (reveal asks for it again).
 * Resolves to the parsed JSON (or null for an empty body); rejects with ApiError.
 */
export async function api(method, path, body, opts = {}) {
  const token = opts.token || session.token;
  const headers = { Accept: 'application/json' };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let resp;
  try {
    resp = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: 'omit',
      cache: 'no-store',
    });
  } catch (e) {
    throw new ApiError(0, `The gateway did not answer (${e.message}).`);
  }
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = text; }
  if (!resp.ok) {
    if (resp.status === 401 && !opts.token && opts.signOutOn401 !== false) {
      window.dispatchEvent(new CustomEvent('keygate:unauthorized'));
    }
    throw new ApiError(resp.status, errorMessage(resp.status, data), data);
  }
  return data;
}

/** Query string from an object, skipping empty values. */
export function qs(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== '') q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `?${s}` : '';
}

/** A list answer's items, whatever the envelope (`items`, `data`, `data.items`, a bare array). */
export function items(data) {
  if (Array.isArray(data)) return data;
  if (!data || typeof data !== 'object') return [];
  if (Array.isArray(data.items)) return data.items;
  if (Array.isArray(data.data)) return data.data;
  if (data.data && Array.isArray(data.data.items)) return data.data.items;
  if (Array.isArray(data.accounts)) return data.accounts;
  if (data.accounts && typeof data.accounts === 'object') {
    return Object.entries(data.accounts).map(([id, a]) => ({ id, ...a }));
  }
  return [];
}

/**
 * Download through fetch with the Bearer header, then a blob URL: the token never goes into a
 * URL, and the browser saves the file under `filename`.
 */
export async function download(path, filename) {
  const resp = await fetch(path, {
    headers: { Authorization: `Bearer ${session.token}` },
    credentials: 'omit',
    cache: 'no-store',
  });
  if (!resp.ok) {
    const text = await resp.text();
    let data = text;
    try { data = JSON.parse(text); } catch { /* plain text */ }
    throw new ApiError(resp.status, errorMessage(resp.status, data), data);
  }
  const blob = await resp.blob();
  const url = URL.createObjectURL(blob);
  const a = document.createElement('a');
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
  return blob;
}
