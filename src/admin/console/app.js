// The console's entry: sign-in, who is signed in, and the page shown for the URL's #hash.

import { api, session } from './api.js';
import { $, $$, fill, formError, notify } from './ui.js';
import { initKeys, loadKeys } from './keys.js';
import { initKeyForm } from './key_form.js';
import { initUsage, showUsage } from './usage.js';
import { initAccounts, loadAccounts, loadAccountChoices } from './accounts.js';

// Any Content-Security-Policy violation is kept where the browser tests can read it.
window.kgCspViolations = [];
document.addEventListener('securitypolicyviolation', (e) => {
  window.kgCspViolations.push(`${e.violatedDirective} ${e.blockedURI}`);
});

/** Check the token against the API; resolves to who it is, rejects with the API's answer. */
async function whoAmI(token) {
  const me = await api('GET', '/admin/v1/session', undefined, { token });
  if (me && me.quota_per_unit) session.quotaPerUnit = me.quota_per_unit;
  return { role: me?.role || 'viewer', account: me?.account || null, name: me?.name || null, vault: !!me?.vault };
}

function showSignIn(message) {
  $('#shell').hidden = true;
  $('#signin').hidden = false;
  formError($('#signin-form'), message || null);
  $('#token').focus();
}

function enterConsole(me) {
  session.me = me;
  document.body.classList.toggle('viewer', me.role === 'viewer');
  // A viewer gets no write controls at all (the API refuses its writes anyway).
  if (!session.canWrite) for (const e of $$('.write')) e.remove();
  if (!session.isFullAdmin) for (const e of $$('.admin-only')) e.remove();
  const label = [me.name || 'signed in', me.role, me.account ? `account ${me.account}` : null]
    .filter(Boolean).join(' · ');
  fill($('#whoami'), label);
  $('#signin').hidden = true;
  $('#shell').hidden = false;
  loadAccountChoices();
  route();
}

async function signIn(ev) {
  ev.preventDefault();
  const f = $('#signin-form');
  const token = $('#token').value.trim();
  const button = $('#signin-button');
  button.disabled = true;
  fill(button, 'Signing in…');
  formError(f, null);
  try {
    const me = await whoAmI(token);
    session.token = token;
    $('#token').value = '';
    enterConsole(me);
  } catch (err) {
    session.token = null;
    formError(f, err.status === 401
      ? 'That token was not accepted (401). Check for a typo or ask for a new admin token.'
      : err.message);
  } finally {
    button.disabled = false;
    fill(button, 'Sign in');
  }
}

function signOut() {
  session.token = null;
  // A fresh page: no data of the previous token stays in the DOM.
  location.hash = '';
  location.reload();
}

function route() {
  if ($('#shell').hidden) return;
  const [name, query] = (location.hash.slice(1) || 'keys').split('?');
  const page = ['keys', 'usage', 'accounts'].includes(name) && $(`#nav-${name}`) ? name : 'keys';
  for (const p of $$('.page')) p.hidden = p.id !== `page-${page}`;
  for (const a of $$('nav a')) a.classList.toggle('active', a.id === `nav-${page}`);
  if (page === 'keys') loadKeys();
  if (page === 'usage') showUsage(new URLSearchParams(query || ''));
  if (page === 'accounts') loadAccounts();
}

async function start() {
  initKeys();
  initKeyForm();
  initUsage();
  initAccounts();
  $('#signin-form').addEventListener('submit', signIn);
  $('#signout').addEventListener('click', signOut);
  window.addEventListener('hashchange', route);
  window.addEventListener('keygate:unauthorized', () => {
    session.token = null;
    notify('Your token is no longer accepted. Sign in again.', 'error');
    showSignIn('Your token is no longer accepted (401). Sign in again.');
  });
  if (!session.token) return showSignIn();
  try {
    enterConsole(await whoAmI(session.token));
  } catch (err) {
    if (err.status === 401) session.token = null;
    showSignIn(err.message);
  }
}

start();
